//! The OpenAI-compatible front door end to end: real containers of `functions/llm-stub`
//! (and the echo function, to see the bytes a function gets), driven by the official
//! `openai` Python package where a client's behaviour matters (retries, errors, stream
//! parsing, base64 embeddings) and by raw HTTP where the bytes on the wire matter.

#![allow(clippy::disallowed_methods)] // tasks a test spawns end with the test

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{python, Gateway};
use http::Method;

/// The llm-stub image, built once per test binary.
fn stub_image() -> String {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| common::function_image("llm-stub"))
        .clone()
}

/// A manifest for the stub serving `models` (the `[openai]` models value), with `env`
/// (TOML inline-table pairs) and more `sections`.
fn stub_manifest(name: &str, models: &str, env: &str, sections: &str) -> String {
    format!(
        "name = \"{name}\"\nimage = \"{}\"\nenv = {{ {env} }}\n[openai]\nmodels = {models}\n\
         [readiness]\nhttp_path = \"/healthz\"\nstart_timeout = \"20s\"\n{sections}\n",
        stub_image()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_client_streams_chats_embeds_and_lists_a_cold_model() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let gw = Gateway::start().await;
    let manifest = stub_manifest(
        "llm",
        "{ \"chat\" = \"stub-chat\" }",
        "MODELS = \"stub-chat\", LOAD_MS = \"300\"",
        "",
    );
    assert_eq!(gw.deploy("llm", &manifest).await.status, 201);
    assert!(gw.containers("llm").is_empty(), "deployed cold");
    let script = r#"
import json, os, openai
c = openai.OpenAI(base_url=os.environ["BASE"], api_key="unused")
out = {}
models = c.models.list()
out["listed"] = [(m.id, m.model_extra["ember"]["state"]) for m in models.data]
s = c.chat.completions.create(model="chat", max_tokens=5, stream=True,
    stream_options={"include_usage": True},
    messages=[{"role": "system", "content": "You are a stub."}, {"role": "user", "content": "hi"}])
chunks = [ch for ch in s]
out["streamed"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
out["chunks"] = len(chunks)
out["first_cached"] = chunks[-1].usage.prompt_tokens_details.cached_tokens
r = c.chat.completions.create(model="chat", max_tokens=5,
    messages=[{"role": "system", "content": "You are a stub."}, {"role": "user", "content": "hi"}])
out["text"] = r.choices[0].message.content
out["model"] = r.model
out["cached"] = r.usage.prompt_tokens_details.cached_tokens
e = c.embeddings.create(model="chat", input=["a", "b"])
out["embeddings"] = [len(d.embedding) for d in e.data]
try:
    c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as err:
    out["unknown"] = [err.status_code, err.code, err.message]
out["after"] = [(m.id, m.model_extra["ember"]["state"]) for m in c.models.list().data]
print(json.dumps(out))
"#;
    let base = format!("{}/v1", gw.url);
    let started = Instant::now();
    let out: serde_json::Value =
        serde_json::from_str(&python::run(&py, script, &[("BASE", &base)])).unwrap();
    eprintln!("client run: {:?}, {out}", started.elapsed());
    assert_eq!(out["listed"], serde_json::json!([["chat", "cold"]]));
    let text = out["text"].as_str().unwrap();
    assert_eq!(text.split_whitespace().count(), 5, "{text}");
    assert_eq!(
        out["model"], "stub-chat",
        "the body reached the server renamed"
    );
    assert_eq!(
        out["streamed"], text,
        "the same prompt streams the same text"
    );
    assert!(out["chunks"].as_u64().unwrap() >= 7, "{out}");
    assert!(
        out["cached"].as_u64().unwrap() > 0,
        "the second call hit the cache"
    );
    assert_eq!(out["embeddings"], serde_json::json!([8, 8]));
    assert_eq!(out["unknown"][0], 404);
    assert_eq!(out["unknown"][1], "model_not_found");
    assert!(
        out["unknown"][2].as_str().unwrap().contains("chat"),
        "{out}"
    );
    assert_eq!(out["after"], serde_json::json!([["chat", "ready"]]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_which_the_client_retries_until_it_is_served() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let gw = Gateway::start().await;
    // One request at a time on one instance, one waiting: the third gets 429. Each
    // request decodes 10 tokens of 100 ms.
    let manifest = stub_manifest(
        "slow",
        "[\"slow\"]",
        "MODELS = \"slow\", DECODE_US_PER_TOKEN = \"100000\"",
        "[scale]\nmax = 1\nconcurrency = 1\n[queue]\ncapacity = 1",
    );
    assert_eq!(gw.deploy("slow", &manifest).await.status, 201);
    let script = r#"
import json, os, threading, time, httpx, openai
base = os.environ["BASE"]
seen = []
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=6,
    http_client=httpx.Client(event_hooks={"response": [lambda r: seen.append((r.status_code, r.headers.get("retry-after")))]}))
quiet = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
ask = lambda c: c.chat.completions.create(model="slow", max_tokens=10, messages=[{"role": "user", "content": "x"}])
ask(quiet)  # the instance is up
holders = [threading.Thread(target=ask, args=(quiet,)) for _ in range(2)]
for t in holders:
    t.start()
    time.sleep(0.2)
r = ask(client)
for t in holders:
    t.join()
print(json.dumps({"seen": seen, "text": r.choices[0].message.content}))
"#;
    let base = format!("{}/v1", gw.url);
    let out: serde_json::Value =
        serde_json::from_str(&python::run(&py, script, &[("BASE", &base)])).unwrap();
    let seen = out["seen"].as_array().unwrap();
    assert!(seen.len() >= 2, "{out}");
    assert_eq!(seen[0], serde_json::json!([429, "1"]), "{out}");
    assert_eq!(seen.last().unwrap()[0], 200, "{out}");
    assert!(!out["text"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_model_needs_a_key_allowed_to_invoke_its_function() {
    require_docker!();
    let Some(py) = python::python() else { return };
    let gw = Gateway::start().await;
    let manifest = stub_manifest(
        "secret-llm",
        "[\"secret\"]",
        "MODELS = \"secret\"",
        "[access]\nprivate = true",
    );
    assert_eq!(gw.deploy("secret-llm", &manifest).await.status, 201);
    let created = gw
        .request(
            Method::POST,
            "/api/v1/keys",
            &[("content-type", "application/json")],
            serde_json::json!({"name": "app", "invoke": ["secret-llm"]}).to_string(),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let key = created.json()["key"].as_str().unwrap().to_string();
    let script = r#"
import json, os, openai
base = os.environ["BASE"]
out = {}
anonymous = openai.OpenAI(base_url=base, api_key="sk-not-a-key", max_retries=0)
try:
    anonymous.chat.completions.create(model="secret", messages=[{"role": "user", "content": "x"}])
except openai.AuthenticationError as err:
    out["refused"] = [err.status_code, err.message]
out["hidden"] = [m.id for m in anonymous.models.list().data]
keyed = openai.OpenAI(base_url=base, api_key=os.environ["KEY"])
out["listed"] = [m.id for m in keyed.models.list().data]
r = keyed.chat.completions.create(model="secret", max_tokens=2, messages=[{"role": "user", "content": "x"}])
out["text"] = r.choices[0].message.content
print(json.dumps(out))
"#;
    let base = format!("{}/v1", gw.url);
    let out: serde_json::Value =
        serde_json::from_str(&python::run(&py, script, &[("BASE", &base), ("KEY", &key)])).unwrap();
    assert_eq!(out["refused"][0], 401, "{out}");
    assert!(out["refused"][1]
        .as_str()
        .unwrap()
        .contains("`secret-llm` is private"));
    assert_eq!(
        out["hidden"],
        serde_json::json!([]),
        "private models are not listed"
    );
    assert_eq!(out["listed"], serde_json::json!(["secret"]));
    assert!(!out["text"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_reach_the_function_untouched_but_for_the_model_and_claims_are_exclusive() {
    require_docker!();
    let gw = Gateway::start().await;
    let echo = common::echo_manifest(
        "mirror",
        "",
        "[openai]\nmodels = { \"whisper\" = \"openai/whisper-large-v3\", \"m\" = \"m\" }",
    );
    assert_eq!(gw.deploy("mirror", &echo).await.status, 201);
    let json = r#"{"model" : "whisper", "x": 1.50, "s": "\u00e9"}"#;
    let r = gw
        .raw_request(Method::POST, "/v1/embeddings", &[], json.to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        r#"{"model" : "openai/whisper-large-v3", "x": 1.50, "s": "\u00e9"}"#
    );
    assert_eq!(r.header("x-echo-uri").as_deref(), Some("/v1/embeddings"));

    let form = "--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF....\r\n--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--b0undary--\r\n";
    let r = gw
        .raw_request(
            Method::POST,
            "/v1/audio/transcriptions",
            &[("content-type", "multipart/form-data; boundary=b0undary")],
            form.to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        form.replace("\r\n\r\nwhisper\r\n", "\r\n\r\nopenai/whisper-large-v3\r\n")
    );

    let bad = gw
        .raw_request(
            Method::POST,
            "/v1/chat/completions",
            &[],
            "{\"messages\":[]}",
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["param"], "model");
    assert!(bad.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("send `model`"));

    // Another function may not claim `m`; the answer names the field and the holder.
    let other = common::echo_manifest("other", "", "[openai]\nmodels = [\"x\", \"m\"]");
    let refused = gw.deploy("other", &other).await;
    assert_eq!(refused.status, 409, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["error"]["code"], "model_taken");
    assert_eq!(body["error"]["details"][0]["field"], "openai.models[1]");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("function `mirror`"));
    // The holder itself may deploy again with it.
    let again = echo.replace("start_timeout = \"20s\"", "start_timeout = \"21s\"");
    assert_eq!(gw.deploy("mirror", &again).await.status, 200);
    // Once the holder is removed, its ids are free and no longer served.
    let removed = gw
        .request(
            Method::DELETE,
            "/api/v1/functions/mirror",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(removed.status, 200, "{}", removed.text());
    let gone = gw
        .raw_request(Method::POST, "/v1/embeddings", &[], json.to_string())
        .await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"]["code"], "model_not_found");
    assert_eq!(gw.deploy("other", &other).await.status, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streaming_request_for_a_slow_starting_model_is_kept_alive_then_streams() {
    require_docker!();
    let gw = Gateway::start().await;
    let manifest = stub_manifest(
        "loader",
        "[\"loader\"]",
        "MODELS = \"loader\", LOAD_MS = \"3500\", DECODE_US_PER_TOKEN = \"20000\"",
        "",
    );
    assert_eq!(gw.deploy("loader", &manifest).await.status, 201);
    // The official client reads through the comments of a held stream.
    if let Some(py) = python::python() {
        let slow = stub_manifest(
            "loader2",
            "[\"loader2\"]",
            "MODELS = \"loader2\", LOAD_MS = \"3000\"",
            "",
        );
        assert_eq!(gw.deploy("loader2", &slow).await.status, 201);
        let script = r#"
import os, openai
c = openai.OpenAI(base_url=os.environ["BASE"], api_key="unused", max_retries=0)
s = c.chat.completions.create(model="loader2", max_tokens=3, stream=True,
    messages=[{"role": "user", "content": "hi"}])
print("".join(ch.choices[0].delta.content or "" for ch in s if ch.choices))
"#;
        let base = format!("{}/v1", gw.url);
        let text = python::run(&py, script, &[("BASE", &base)]);
        assert_eq!(text.split_whitespace().count(), 3, "{text}");
    }
    let body = r#"{"model":"loader","stream":true,"max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;
    let started = Instant::now();
    let r = gw
        .raw_request(Method::POST, "/v1/chat/completions", &[], body.to_string())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    let text = r.text();
    assert!(
        text.starts_with(": ember: model loader is starting\n\n"),
        "{text}"
    );
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(3500));
    // Warm now: the answer is the instance's own, no comment in front.
    let r = gw
        .raw_request(Method::POST, "/v1/chat/completions", &[], body.to_string())
        .await;
    assert!(r.text().starts_with("data: {"), "{}", r.text());
    assert_eq!(r.header("x-accel-buffering").as_deref(), Some("no"));
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_routing_keeps_each_system_prompt_on_one_instance() {
    require_docker!();
    let gw = Gateway::start().await;
    let manifest = stub_manifest(
        "pool",
        "[\"pool\"]",
        "MODELS = \"pool\"",
        "[scale]\nmin = 3\nmax = 3\nconcurrency = 8",
    );
    assert_eq!(gw.deploy("pool", &manifest).await.status, 201);
    common::eventually(Duration::from_secs(30), "3 ready instances", || async {
        gw.function("pool").await["ready"] == 3
    })
    .await;
    let mut owner = std::collections::HashMap::new();
    let mut cached = 0u64;
    let mut prompt = 0u64;
    for round in 0..4 {
        for sys in 0..6 {
            let body = serde_json::json!({
                "model": "pool",
                "max_tokens": 1,
                "messages": [
                    {"role": "system", "content": format!("System prompt number {sys}. ").repeat(20)},
                    {"role": "user", "content": format!("question {round}")},
                ],
            });
            let r = gw
                .raw_request(
                    Method::POST,
                    "/v1/chat/completions",
                    &[],
                    Bytes::from(body.to_string()),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let usage = &r.json()["usage"]["stub"];
            cached += usage["cached_bytes"].as_u64().unwrap();
            prompt += usage["prompt_bytes"].as_u64().unwrap();
            let instance = r.header("x-stub-instance").unwrap();
            let first = owner.entry(sys).or_insert_with(|| instance.clone());
            assert_eq!(*first, instance, "system prompt {sys} moved");
        }
    }
    let distinct: std::collections::HashSet<_> = owner.values().collect();
    assert!(
        distinct.len() >= 2,
        "6 prompts all on one instance: {owner:?}"
    );
    let ratio = cached as f64 / prompt as f64;
    eprintln!(
        "prefix routing: {:.1}% of prompt bytes from cache",
        ratio * 100.0
    );
    assert!(ratio > 0.7, "{ratio}");
}
