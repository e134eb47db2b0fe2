#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a figure that other
# work on the machine does not move (CPU time per request does), for comparing two builds
# of the gateway on a busy machine.
#
#   bash benches/profile/instructions.sh [BINARY] [CONNECTIONS] [SECONDS]
#
# BINARY defaults to target/release/ember (cargo build --release first). SERVE_ARGS adds
# flags to `ember serve`, e.g. SERVE_ARGS="--history-max 0" to count without the history.
# Needs valgrind, wrk and Docker (apt install valgrind wrk). It starts the gateway under callgrind with
# instrumentation off, deploys functions/echo with one warm instance, sends wrk's POSTs of
# 5 bytes for a few seconds to warm up, then counts instructions over SECONDS of load
# (default 10) and divides by the requests wrk completed. The gateway runs about 50 times
# slower under callgrind, so the count covers a few thousand requests; background loops
# are included (a few hundred instructions per request at most).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BIN=${1:-target/release/ember}
CONNECTIONS=${2:-16}
SECONDS_MEASURED=${3:-10}
for tool in valgrind callgrind_control callgrind_annotate wrk docker; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt install valgrind wrk)" >&2; exit 1; }
done
IMAGE=ember-profile/echo:latest
if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    bash functions/build.sh >/dev/null
    docker build -q -t "$IMAGE" functions/echo >/dev/null
fi
DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$DIR/callgrind.out" \
    "$BIN" serve --data-dir "$DIR/data" --listen "127.0.0.1:$PORT" ${SERVE_ARGS:-} >"$DIR/gateway.log" 2>&1 &
GATEWAY=$!
cleanup() {
    kill "$GATEWAY" 2>/dev/null || true
    wait "$GATEWAY" 2>/dev/null || true
    docker ps -aq --filter label=ember.function=profile | xargs -r docker rm -f >/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
for _ in $(seq 300); do
    [ -f "$DIR/data/admin.token" ] && curl -fs "127.0.0.1:$PORT/healthz" >/dev/null && break
    sleep 0.2
done
TOKEN=$(cat "$DIR/data/admin.token")
printf 'name = "profile"\nimage = "%s"\n[readiness]\nhttp_path = "/healthz"\n[scale]\nmin = 1\nmax = 1\nconcurrency = 1000\nidle_timeout = "1h"\n' \
    "$IMAGE" >"$DIR/ember.toml"
curl -fs -X PUT -H "Authorization: Bearer $TOKEN" -H 'content-type: application/toml' \
    --data-binary @"$DIR/ember.toml" "127.0.0.1:$PORT/api/v1/functions/profile" >/dev/null
for _ in $(seq 300); do
    curl -fs -d hello "127.0.0.1:$PORT/fn/profile/" >/dev/null && break
    sleep 0.2
done
printf 'wrk.method = "POST"\nwrk.body = "hello"\n' >"$DIR/post.lua"
URL="http://127.0.0.1:$PORT/fn/profile/"
wrk -t1 -c"$CONNECTIONS" -d3s -s "$DIR/post.lua" "$URL" >/dev/null
callgrind_control -i on "$GATEWAY" >/dev/null
OUT=$(wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_MEASURED}s" -s "$DIR/post.lua" "$URL")
callgrind_control -i off "$GATEWAY" >/dev/null
callgrind_control -d "$GATEWAY" >/dev/null
sleep 1
REQUESTS=$(echo "$OUT" | awk '/requests in/{print $1}')
PROFILE=$(ls -t "$DIR"/callgrind.out* | head -1)
TOTAL=$(callgrind_annotate "$PROFILE" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",", "", $1); print $1}')
cp "$PROFILE" target/callgrind.out 2>/dev/null || true
echo "connections=$CONNECTIONS requests=$REQUESTS instructions=$TOTAL per_request=$((TOTAL / REQUESTS))"
echo "profile: target/callgrind.out (callgrind_annotate --inclusive=yes target/callgrind.out)"
