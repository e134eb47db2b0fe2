"""The OpenAI-compatible front door with the official `openai` package.

    pip install openai
    bash functions/build.sh && ember deploy functions/llm-stub     # model "stub-chat"
    python examples/openai/chat.py [GATEWAY_URL] [MODEL]

The client needs nothing of Ember: a base URL and a model id. A cold model is started
while the request waits; a full queue answers 429 with Retry-After, which the client
retries by itself. OPENAI_API_KEY carries an invoke key for a private function's model.
"""

import os
import sys

import openai

base = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080") + "/v1"
model = sys.argv[2] if len(sys.argv) > 2 else "stub-chat"
client = openai.OpenAI(base_url=base, api_key=os.environ.get("OPENAI_API_KEY", "none"))

for m in client.models.list():
    ember = (m.model_extra or {}).get("ember", {})
    print(f"model {m.id}: {ember.get('state')} (function {ember.get('function')})")

reply = client.chat.completions.create(
    model=model,
    max_tokens=8,
    messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ],
)
print("chat:", reply.choices[0].message.content)

print("stream:", end=" ", flush=True)
stream = client.chat.completions.create(
    model=model,
    max_tokens=8,
    stream=True,
    messages=[{"role": "user", "content": "Count to three."}],
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
