//! The ComfyUI front door end to end: real containers of `functions/comfyui-stub` behind
//! `/comfy/NAME/...` and the root listener (`--comfyui-listen`), driven by a Python
//! client written the way ComfyUI's `script_examples/websockets_api_example.py` is
//! (`websocket-client` and `urllib`): queue a prompt, read the socket until `executing`
//! with `node: null`, read `/history/{id}`, download every image with `/view`.

#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::{Duration, Instant};

use common::{python, Gateway};
use http::Method;
use serde_json::{json, Value};

/// The comfyui-stub image, built once per test binary.
fn stub_image() -> String {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| common::function_image("comfyui-stub"))
        .clone()
}

/// Deploys the stub as `name`, cold, with `step_ms` per sampler step, `scale` lines and
/// more `sections`.
async fn deploy_stub(gw: &Gateway, name: &str, step_ms: u32, scale: &str, sections: &str) {
    let manifest = stub_manifest(name, step_ms, scale, sections);
    assert_eq!(gw.deploy(name, &manifest).await.status, 201);
}

/// A manifest for the stub with `step_ms` per sampler step and more `sections`.
fn stub_manifest(name: &str, step_ms: u32, scale: &str, sections: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{}\"\nport = 8188\nenv = {{ STEP_MS = \"{step_ms}\" }}\n\
         [comfyui]\n[readiness]\nhttp_path = \"/system_stats\"\nstart_timeout = \"20s\"\n\
         [scale]\nconcurrency = 1\n{scale}\n{sections}\n",
        stub_image()
    )
}

/// The client's functions, as ComfyUI's example writes them, plus checks of what came back.
const CLIENT: &str = include_str!("comfyui/client.py");

fn client(py: &std::path::PathBuf, body: &str, env: &[(&str, &str)]) -> Value {
    let script = format!("{CLIENT}\n{body}");
    let out = python::run(py, &script, env);
    let last = out.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A free port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_written_like_comfyuis_example_runs_a_prompt_through_both_addresses() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let gw = Gateway::builder()
        .args(["--comfyui-listen", &listen, "--comfyui-function", "comfy"])
        .start()
        .await;
    deploy_stub(&gw, "comfy", 20, "max = 1", "").await;
    assert!(gw.containers("comfy").is_empty(), "deployed cold");
    let body = r#"
out = {}
cid = str(uuid.uuid4())
ws = connect(cid)
first = json.loads(ws.recv())
out["first"] = first
status, answer = queue_prompt(graph(42, 5), cid)
out["queued"] = [status, sorted(answer)]
pid = answer["prompt_id"]
messages, previews = read_until_done(ws, pid)
out["types"] = sorted(set(m["type"] for m in messages))
out["foreign"] = [m for m in messages if m["data"].get("prompt_id") not in (None, pid)]
out["previews"] = [len(p) > 8 and p[:4] == b"\x00\x00\x00\x01" and p[8:12] == b"\x89PNG" for p in previews]
status, history = request("/history/" + pid)
entry = history[pid]
out["status"] = entry["status"]["status_str"]
out["pngs"] = [check_png(view(img)) for img in images(entry)]
out["kept_under"] = [img["subfolder"] == pid for img in images(entry)]
out["unknown"] = request("/history/nope")
# Warm: how long from POST /prompt to execution_start.
t0 = time.time()
status, answer = queue_prompt(graph(7, 1), cid, prompt_id="mine-1")
pid2 = answer["prompt_id"]
started = None
def seen(m):
    global started
    if m["type"] == "execution_start" and started is None:
        started = time.time()
read_until_done(ws, pid2, seen)
out["warm_start_ms"] = (started - t0) * 1000
out["own_id"] = pid2
status, bad = queue_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}}, cid)
out["bad"] = [status, bad["error"]["type"], bad["error"]["message"]]
out["queue"] = request("/queue")[1]
# The web UI's files come from the instance while it runs a prompt, without waiting for it.
status, answer = queue_prompt(graph(3, 50), cid)
t0 = time.time()
page = urllib.request.urlopen(urllib.request.Request(BASE + "/", headers=HEADERS))
out["page"] = [page.status, page.read().lower().startswith(b"<!doctype html"), time.time() - t0 < 0.5,
               len(request("/queue")[1]["queue_running"])]
read_until_done(ws, answer["prompt_id"])
out["object_info"] = sorted(request("/object_info")[1])[:3]
out["stats_devices"] = request("/system_stats")[1]["devices"]
print(json.dumps(out))
"#;
    let prefixed = format!("{}/comfy/comfy", gw.url);
    let started = Instant::now();
    let out = client(&py, body, &[("BASE", &prefixed)]);
    eprintln!("first run (cold) {:?}: {out}", started.elapsed());
    assert_eq!(out["first"]["type"], "status");
    assert!(out["first"]["data"]["sid"].is_string());
    assert_eq!(
        out["queued"],
        json!([200, ["node_errors", "number", "prompt_id"]])
    );
    for t in [
        "execution_start",
        "executing",
        "progress",
        "executed",
        "execution_success",
    ] {
        assert!(
            out["types"].as_array().unwrap().contains(&json!(t)),
            "{t}: {out}"
        );
    }
    assert_eq!(out["foreign"], json!([]));
    let previews = out["previews"].as_array().unwrap();
    assert!(
        !previews.is_empty() && previews.iter().all(|p| p == true),
        "{out}"
    );
    assert_eq!(out["status"], "success");
    assert_eq!(out["pngs"], json!([true]));
    assert_eq!(
        out["kept_under"],
        json!([true]),
        "outputs are kept per prompt: {out}"
    );
    assert_eq!(out["unknown"], json!([200, {}]));
    assert_eq!(out["own_id"], "mine-1", "a client's prompt_id is kept");
    assert_eq!(out["bad"][0], 400, "{out}");
    assert_eq!(out["bad"][1], "invalid_prompt");
    assert_eq!(
        out["queue"],
        json!({"queue_running": [], "queue_pending": []})
    );
    assert!(out["warm_start_ms"].as_f64().unwrap() < 500.0, "{out}");
    assert_eq!(out["page"], json!([200, true, true, 1]), "{out}");
    eprintln!(
        "warm POST /prompt -> execution_start: {} ms",
        out["warm_start_ms"]
    );

    // The same client against the root listener, through /api/..., warm.
    let root = format!("http://{listen}/api");
    let body = r#"
cid = "root-client"
ws = connect(cid)
ws.recv()
status, answer = queue_prompt(graph(1, 2), cid)
read_until_done(ws, answer["prompt_id"])
entry = request("/history/" + answer["prompt_id"])[1][answer["prompt_id"]]
print(json.dumps({"pngs": [check_png(view(i)) for i in images(entry)], "all": len(request("/history")[1])}))
"#;
    let out = client(&py, body, &[("BASE", &root)]);
    assert_eq!(out, json!({"pngs": [true], "all": 4}));
}

#[tokio::test(flavor = "multi_thread")]
async fn three_clients_share_three_instances_see_only_their_own_and_outputs_outlive_them() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let gw = Gateway::start().await;
    // 4 prompts × 3 clients of 10 steps × 100 ms: about 1 s each.
    deploy_stub(&gw, "pool", 100, "max = 3\nidle_timeout = \"2s\"", "").await;
    let body = r#"
results, lock = {}, threading.Lock()
def one_client(n):
    cid = "client-%d" % n
    ws = connect(cid)
    mine, seen = [], []
    for i in range(4):
        status, answer = queue_prompt(graph(n * 10 + i, 10), cid)
        assert status == 200, answer
        mine.append(answer["prompt_id"])
    done = 0
    while done < 4:
        out = ws.recv()
        if isinstance(out, str):
            m = json.loads(out)
            pid = m["data"].get("prompt_id")
            if pid is not None:
                seen.append(pid)
            if m["type"] == "executing" and m["data"]["node"] is None:
                done += 1
    with lock:
        results[cid] = {"mine": mine, "foreign": sorted(set(seen) - set(mine))}
t0 = time.time()
threads = [threading.Thread(target=one_client, args=(n,)) for n in range(3)]
running = []
def watch():
    while any(t.is_alive() for t in threads):
        running.append(len(request("/queue")[1]["queue_running"]))
        time.sleep(0.1)
for t in threads: t.start()
w = threading.Thread(target=watch); w.start()
for t in threads: t.join()
w.join()
elapsed = time.time() - t0
history = request("/history")[1]
print(json.dumps({"results": results, "elapsed": elapsed, "most_running": max(running),
                  "done": sorted(e["status"]["status_str"] for e in history.values()),
                  "ids": sorted(history)}))
"#;
    let base = format!("{}/comfy/pool", gw.url);
    let out = client(&py, body, &[("BASE", &base)]);
    eprintln!("12 prompts on up to 3 instances: {out}");
    for (cid, r) in out["results"].as_object().unwrap() {
        assert_eq!(r["foreign"], json!([]), "{cid} saw another client's prompt");
    }
    assert_eq!(out["most_running"], 3, "three prompts ran at once: {out}");
    assert_eq!(out["done"], json!(vec!["success"; 12]));
    // Scaled to zero, the history and the images still answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gw.containers("pool").is_empty() {
        assert!(Instant::now() < deadline, "the pool did not scale to zero");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = r#"
history = request("/history")[1]
print(json.dumps({"n": len(history), "pngs": all(check_png(view(i)) for e in history.values() for i in images(e))}))
"#;
    let out = client(&py, body, &[("BASE", &base)]);
    assert_eq!(out, json!({"n": 12, "pngs": true}));
    assert!(
        gw.containers("pool").is_empty(),
        "reading history started nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_reaches_a_fresh_instance_and_a_killed_instances_prompt_runs_again() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let gw = Gateway::start().await;
    deploy_stub(&gw, "up", 100, "max = 2", "").await;
    // Upload at zero: the gateway keeps it.
    let png = b"\x89PNG\r\n\x1a\nnot really";
    let boundary = "XyZ";
    let mut form = Vec::new();
    form.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"fox.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
    form.extend_from_slice(png);
    form.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\nrefs\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = gw
        .request(
            Method::POST,
            "/comfy/up/upload/image",
            &[("content-type", &ct)],
            form.clone(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"name": "fox.png", "subfolder": "refs", "type": "input"})
    );
    assert!(gw.containers("up").is_empty(), "an upload starts nothing");
    let again = gw
        .request(
            Method::POST,
            "/comfy/up/upload/image",
            &[("content-type", &ct)],
            form.clone(),
        )
        .await;
    assert_eq!(
        again.json()["name"],
        "fox.png",
        "the same bytes keep the name"
    );
    let view = gw
        .request(
            Method::GET,
            "/comfy/up/view?filename=fox.png&subfolder=refs&type=input",
            &[],
            "",
        )
        .await;
    assert_eq!(&view.body[..], png);
    let escape = gw
        .request(
            Method::GET,
            "/comfy/up/view?filename=x.png&subfolder=../..&type=input",
            &[],
            "",
        )
        .await;
    assert_eq!(escape.status, 403);

    let body = r#"
cid = "uploader"
ws = connect(cid)
ws.recv()
status, answer = queue_prompt(graph(5, 2, image="refs/fox.png"), cid)
assert status == 200, answer
read_until_done(ws, answer["prompt_id"])
first = request("/history/" + answer["prompt_id"])[1][answer["prompt_id"]]["status"]["status_str"]
# A long prompt whose instance is killed once it has started.
status, answer = queue_prompt(graph(6, 40), cid)
pid = answer["prompt_id"]
def started(m):
    if m["type"] == "execution_start":
        print("STARTED", flush=True)
        sys.stdin.readline()   # the test kills the instance, then answers
messages, _ = read_until_done(ws, pid, started)
entry = request("/history/" + pid)[1][pid]
print(json.dumps({"upload_used": first, "rerun": entry["status"]["status_str"],
                  "starts": sum(1 for m in messages if m["type"] == "execution_start"),
                  "pngs": [check_png(view(i)) for i in images(entry)]}))
"#;
    let script = format!("{CLIENT}\n{body}");
    let base = format!("{}/comfy/up", gw.url);
    let mut child = std::process::Command::new(&py)
        .arg("-c")
        .arg(&script)
        .env("BASE", &base)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::{BufRead, Write};
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "STARTED", "{line}");
    let running = gw.containers("up");
    assert!(!running.is_empty());
    for c in &running {
        std::process::Command::new("docker")
            .args(["kill", c])
            .output()
            .unwrap();
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
    let out: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(
        out["upload_used"], "success",
        "the upload reached the instance: {out}"
    );
    assert_eq!(out["rerun"], "success", "{out}");
    assert_eq!(out["starts"], 2, "the prompt ran twice: {out}");
    assert_eq!(out["pngs"], json!([true]));
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupt_stops_the_callers_prompt_only_and_keys_scope_the_queue() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let gw = Gateway::start().await;
    deploy_stub(&gw, "priv", 100, "max = 2", "[access]\nprivate = true").await;
    let key = |name: &str| {
        let out = gw.cli(&["keys", "create", "--name", name, "--invoke", "priv"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    let (a, b) = (key("alice"), key("bob"));
    let base = format!("{}/comfy/priv", gw.url);
    let denied = gw.request(Method::GET, "/comfy/priv/queue", &[], "").await;
    assert_eq!(denied.status, 401);
    // Both queue a 4 s prompt; each interrupts without naming one: only its own stops.
    let body = r#"
cid = os.environ["CID"]
ws = connect(cid)
ws.recv()
status, answer = queue_prompt(graph(1, 40), cid)
pid = answer["prompt_id"]
def on(m):
    if m["type"] == "execution_start" and os.environ.get("STOP"):
        time.sleep(0.3)
        request("/interrupt", {})
messages, _ = read_until_done(ws, pid, on)
entry = request("/history/" + pid)[1][pid]
print(json.dumps({"status": entry["status"]["status_str"], "history": sorted(request("/history")[1]),
                  "types": sorted(set(m["type"] for m in messages)), "pid": pid}))
"#;
    let (py2, base2, a2, b2) = (py.clone(), base.clone(), a.clone(), b.clone());
    let alice = std::thread::spawn(move || {
        client(
            &py2,
            body,
            &[("BASE", &base2), ("KEY", &a2), ("CID", "a"), ("STOP", "1")],
        )
    });
    let bob = client(&py, body, &[("BASE", &base), ("KEY", &b2), ("CID", "b")]);
    let alice = alice.join().unwrap();
    assert_eq!(alice["status"], "error", "{alice}");
    assert!(alice["types"]
        .as_array()
        .unwrap()
        .contains(&json!("execution_interrupted")));
    assert_eq!(bob["status"], "success", "{bob}");
    assert_eq!(
        alice["history"],
        json!([alice["pid"]]),
        "alice sees her prompts only"
    );
    assert_eq!(bob["history"], json!([bob["pid"]]));
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_accepted_before_the_gateway_is_killed_run_after_it_restarts() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::builder().data_dir(dir.path()).start().await;
    // The restarted gateway keeps the id (same data dir) and leaves containers running
    // when it stops, as every gateway does: this removes them.
    let _cleanup = common::Cleanup(format!("ember.gateway={}", gw.id));
    deploy_stub(&gw, "durable", 100, "max = 1", "").await;
    let base = format!("{}/comfy/durable", gw.url);
    // One running 3 s prompt and two waiting behind it, then SIGKILL.
    let body = r#"
ids = []
for seed in range(3):
    status, answer = queue_prompt(graph(seed, 30), "restarter")
    assert status == 200, answer
    ids.append(answer["prompt_id"])
print(json.dumps({"ids": ids, "queue": request("/queue")[1]}))
"#;
    let out = client(&py, body, &[("BASE", &base)]);
    assert_eq!(
        out["queue"]["queue_pending"].as_array().unwrap().len()
            + out["queue"]["queue_running"].as_array().unwrap().len(),
        3,
        "{out}"
    );
    gw.kill();
    let gw = Gateway::builder().data_dir(dir.path()).start().await;
    let base = format!("{}/comfy/durable", gw.url);
    let body = r#"
ids = json.loads(os.environ["IDS"])
deadline = time.time() + 60
while time.time() < deadline:
    history = request("/history")[1]
    if all(i in history for i in ids):
        break
    time.sleep(0.2)
print(json.dumps({i: history.get(i, {}).get("status", {}).get("status_str") for i in ids}))
"#;
    let ids = out["ids"].to_string();
    let done = client(&py, body, &[("BASE", &base), ("IDS", &ids)]);
    for id in out["ids"].as_array().unwrap() {
        assert_eq!(done[id.as_str().unwrap()], "success", "{done}");
    }
}
