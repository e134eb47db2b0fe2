# The client the ComfyUI tests (tests/comfyui.rs) run: written the way ComfyUI's
# script_examples/websockets_api_example.py is (websocket-client and urllib), plus checks
# of what comes back. Each test appends its own body to this file.
import json, os, sys, threading, time, uuid, zlib, struct, urllib.request, urllib.parse
import websocket

BASE = os.environ["BASE"]                      # http://host:port[/comfy/NAME]
WS = BASE.replace("http://", "ws://", 1)
HEADERS = {}
if os.environ.get("KEY"):
    HEADERS["Authorization"] = "Bearer " + os.environ["KEY"]

def graph(seed, steps, image=None):
    g = {
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 8, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
              "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "stub.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ember", "images": ["8", 0]}},
    }
    if image:
        g["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    return g

def request(path, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method, headers=dict(HEADERS, **({"Content-Type": "application/json"} if data else {})))
    try:
        with urllib.request.urlopen(req) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")

def queue_prompt(prompt, client_id, prompt_id=None):
    body = {"prompt": prompt, "client_id": client_id}
    if prompt_id:
        body["prompt_id"] = prompt_id
    return request("/prompt", body)

def connect(client_id):
    ws = websocket.WebSocket()
    url = "{}/ws?clientId={}".format(WS, client_id)
    if os.environ.get("KEY"):
        url += "&token=" + urllib.parse.quote(os.environ["KEY"])
    ws.connect(url)
    return ws

def read_until_done(ws, prompt_id, on_message=None):
    """Every message up to the final executing of prompt_id: (json messages, binary frames)."""
    messages, previews = [], []
    while True:
        out = ws.recv()
        if isinstance(out, str):
            m = json.loads(out)
            messages.append(m)
            if on_message:
                on_message(m)
            if m["type"] == "executing" and m["data"]["node"] is None and m["data"]["prompt_id"] == prompt_id:
                return messages, previews
        else:
            previews.append(out)

def view(image):
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]})
    req = urllib.request.Request(BASE + "/view?" + query, headers=HEADERS)
    with urllib.request.urlopen(req) as r:
        return r.read()

def check_png(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc, = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xffffffff == crc, kind
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert len(zlib.decompress(idat)) > 0
    return True

def images(entry):
    return [img for out in entry["outputs"].values() for img in out.get("images", [])]
