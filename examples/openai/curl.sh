#!/usr/bin/env bash
# The OpenAI-compatible front door with curl: list the models (cold ones too), then a chat
# completion and a streamed one. Any model of a function with an [openai] section works;
# the default is the stand-in model server:
#   bash functions/build.sh && ember deploy functions/llm-stub      # model "stub-chat"
#   bash examples/openai/curl.sh [GATEWAY_URL] [MODEL]
# A private function's model needs an invoke key: OPENAI_API_KEY=ek_... bash curl.sh
set -euo pipefail
base="${1:-http://127.0.0.1:8080}/v1"
model="${2:-stub-chat}"
auth=()
[[ -n "${OPENAI_API_KEY:-}" ]] && auth=(-H "Authorization: Bearer $OPENAI_API_KEY")

echo "== GET $base/models"
curl -sS --fail-with-body "${auth[@]}" "$base/models"
echo

echo "== chat (a cold model starts first; the request waits for it)"
curl -sS --fail-with-body "${auth[@]}" "$base/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"model":"'"$model"'","max_tokens":8,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello."}]}'
echo

echo "== streamed chat (server-sent events, as the model writes them)"
curl -sS -N --fail-with-body "${auth[@]}" "$base/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"model":"'"$model"'","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"Count to three."}]}'
