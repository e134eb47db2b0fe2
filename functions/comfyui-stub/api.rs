//! The HTTP routes, each at its path and under `/api`: the prompt, queue, history and
//! interrupt routes of ComfyUI's `server.py`, with its answers' shapes and status codes,
//! and the small information routes clients read at start (`/object_info`,
//! `/system_stats`, `/models`, `/embeddings`, `/features`). Files are in `files.rs`.

use std::io::{self, Write};

use crate::graph::{self, Checked, Rejected};
use crate::json::{self, quote, Json};
use crate::queue::Task;
use crate::{files, nodes, send, str_list, uuid4, Request, Server, JSON, TEXT};

/// The server's feature flags: `/features`, and the answer to a socket's `feature_flags`.
/// Previews are plain PNG frames (no metadata); uploads up to ComfyUI's default 100 MiB.
pub const FEATURES: &str = r#"{"supports_preview_metadata":false,"max_upload_size":104857600}"#;

/// Keys ComfyUI takes out of `extra_data` before it queues a prompt (API credentials).
const SENSITIVE_KEYS: &[&str] = &["auth_token_comfy_org", "api_key_comfy_org"];

/// The page at `/`.
const INDEX: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>comfyui-stub</title></head>
<body><h1>comfyui-stub</h1>
<p>A stand-in ComfyUI server for tests and demos: it speaks ComfyUI's HTTP API and
WebSocket protocol but runs no model. Its images are noise seeded by the KSampler seed.</p>
<ul><li><a href="/system_stats">/system_stats</a></li><li><a href="/object_info">/object_info</a></li>
<li><a href="/queue">/queue</a></li><li><a href="/history">/history</a></li></ul>
</body></html>
"#;

/// An answer, before it is written.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: String) -> Reply {
        Reply { status, headers: vec![("content-type".into(), JSON.into())], body: body.into_bytes() }
    }

    pub fn text(status: u16, body: &str) -> Reply {
        Reply { status, headers: vec![("content-type".into(), TEXT.into())], body: body.as_bytes().to_vec() }
    }

    /// No body, as aiohttp's bare `web.Response(status=...)`.
    pub fn empty(status: u16) -> Reply {
        Reply { status, headers: vec![("content-type".into(), "application/octet-stream".into())], body: Vec::new() }
    }
}

/// The route a path names: `/api/X` is `/X`.
pub fn route_path(path: &str) -> &str {
    match path.strip_prefix("/api") {
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// Answers one request; whether the connection may carry another.
pub fn handle<W: Write>(req: &Request, server: &Server, w: &mut W, keep: bool) -> io::Result<bool> {
    let reply = route(req, server);
    let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    send(w, reply.status, &headers, &reply.body, keep)?;
    Ok(keep)
}

fn route(req: &Request, server: &Server) -> Reply {
    let path = route_path(req.target.split('?').next().unwrap_or_default());
    let query = files::query(&req.target);
    let queue = &server.queue;
    match (req.method.as_str(), path) {
        ("GET", "/") => Reply {
            status: 200,
            headers: vec![("content-type".into(), "text/html; charset=utf-8".into())],
            body: INDEX.as_bytes().to_vec(),
        },
        ("GET", "/ws") => Reply::text(400, "expected a WebSocket upgrade"),
        ("GET", "/prompt") => Reply::json(200, exec_info(queue.remaining())),
        ("POST", "/prompt") => post_prompt(req, server),
        ("GET", "/queue") => Reply::json(200, queue.render()),
        ("POST", "/queue") => post_queue(req, server),
        ("POST", "/interrupt") => {
            let body = json::parse(&req.body).unwrap_or(Json::Null);
            let id = body.get("prompt_id").and_then(Json::as_str).filter(|id| !id.is_empty());
            queue.interrupt(id);
            Reply::empty(200)
        }
        ("POST", "/free") => Reply::empty(200),
        ("GET", "/history") => history(&query, server),
        ("POST", "/history") => post_history(req, server),
        ("GET", p) if p.starts_with("/history/") => {
            let id = files::percent_decode(&p["/history/".len()..], false);
            Reply::json(200, queue.history_item(&id))
        }
        ("GET", "/view") => files::view(&server.dirs, &query),
        ("POST", "/upload/image") => files::upload(&server.dirs, req, false),
        ("POST", "/upload/mask") => files::upload(&server.dirs, req, true),
        ("GET", "/object_info") => Reply::json(200, nodes::object_info(&server.dirs, None)),
        ("GET", p) if p.starts_with("/object_info/") => {
            let class = files::percent_decode(&p["/object_info/".len()..], false);
            Reply::json(200, nodes::object_info(&server.dirs, Some(&class)))
        }
        ("GET", "/system_stats") => Reply::json(200, system_stats()),
        ("GET", "/embeddings") => Reply::json(200, "[]".into()),
        ("GET", "/features") => Reply::json(200, FEATURES.into()),
        ("GET", "/models") => Reply::json(200, r#"["checkpoints","loras","vae"]"#.into()),
        ("GET", "/models/checkpoints") => Reply::json(200, str_list(nodes::CHECKPOINTS)),
        ("GET", "/models/loras" | "/models/vae") => Reply::json(200, "[]".into()),
        (_, p) if is_route(p) => Reply::text(405, "405: Method Not Allowed"),
        _ => Reply::text(404, "404: Not Found"),
    }
}

/// Whether some method is served at `path`.
fn is_route(path: &str) -> bool {
    const ROUTES: &[&str] = &[
        "/", "/ws", "/prompt", "/queue", "/interrupt", "/free", "/history", "/view", "/upload/image", "/upload/mask",
        "/object_info", "/system_stats", "/embeddings", "/features", "/models",
    ];
    ROUTES.contains(&path) || path.starts_with("/history/") || path.starts_with("/object_info/")
}

/// `{"exec_info": {"queue_remaining": N}}`.
fn exec_info(remaining: usize) -> String {
    format!(r#"{{"exec_info":{{"queue_remaining":{remaining}}}}}"#)
}

/// A rejected prompt: `{"error": {...}, "node_errors": {...}}` with 400.
fn prompt_error(kind: &'static str, message: &str) -> Reply {
    let error = graph::error(kind, message, "", "{}").render();
    Reply::json(400, format!(r#"{{"error":{error},"node_errors":{{}}}}"#))
}

/// Python's truthiness of a JSON value (`if json_data["clear"]:`).
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Num(n) => *n != 0.0,
        Json::Str(s) => !s.is_empty(),
        Json::Arr(items) => !items.is_empty(),
        Json::Obj(members) => !members.is_empty(),
    }
}

/// `POST /prompt`: validates the graph and queues it; `{prompt_id, number, node_errors}`.
fn post_prompt(req: &Request, server: &Server) -> Reply {
    let body = match json::parse(&req.body) {
        Ok(body @ Json::Obj(_)) => body,
        Ok(_) => return prompt_error("invalid_prompt", "the body must be a JSON object"),
        Err(e) => return prompt_error("invalid_prompt", &format!("the body is not JSON: {e}")),
    };
    // As ComfyUI: the counter moves on before the prompt is looked at.
    let front = body.get("front").is_some_and(truthy);
    let Some(number) = server.queue.number(body.get("number"), front) else {
        return prompt_error("invalid_prompt", "`number` must be a number");
    };
    let Some(prompt) = body.get("prompt") else {
        let error = graph::error("no_prompt", "No prompt provided", "", "{}").render();
        return Reply::json(400, format!(r#"{{"error":{error},"node_errors":{{}}}}"#));
    };
    let id = match body.get("prompt_id") {
        None | Some(Json::Null) => uuid4(),
        Some(Json::Str(s)) => s.clone(),
        Some(other) => crate::to_json(other, false),
    };
    let mut extra_data = match body.get("extra_data") {
        None => Vec::new(),
        Some(Json::Obj(members)) => members.clone(),
        Some(_) => return prompt_error("invalid_prompt", "`extra_data` must be an object"),
    };
    if let Some(client_id) = body.get("client_id") {
        extra_data.retain(|(k, _)| k != "client_id");
        extra_data.push(("client_id".into(), client_id.clone()));
    }
    extra_data.retain(|(k, _)| !SENSITIVE_KEYS.contains(&k.as_str()));
    match graph::validate(prompt, &server.dirs) {
        Ok(Checked { outputs, node_errors }) => {
            let number_text = number.1.clone();
            let task = Task::new(number, id.clone(), prompt.clone(), Json::Obj(extra_data), outputs);
            let remaining = server.queue.put(task);
            server.sockets.status(remaining);
            Reply::json(200, format!(r#"{{"prompt_id":{},"number":{number_text},"node_errors":{node_errors}}}"#, quote(&id)))
        }
        Err(Rejected { error, node_errors }) => {
            Reply::json(400, format!(r#"{{"error":{error},"node_errors":{node_errors}}}"#))
        }
    }
}

/// The ids of a `{"delete": [...]}` body.
fn delete_ids(body: &Json) -> Vec<&str> {
    body.get("delete").and_then(Json::as_array).unwrap_or_default().iter().filter_map(Json::as_str).collect()
}

/// `POST /queue`: `{"clear": true}` drops the pending prompts, `{"delete": [ids]}` some.
fn post_queue(req: &Request, server: &Server) -> Reply {
    let Ok(body) = json::parse(&req.body) else { return Reply::text(400, "the body is not JSON") };
    let mut changed = false;
    if body.get("clear").is_some_and(truthy) {
        server.queue.clear_pending();
        changed = true;
    }
    for id in delete_ids(&body) {
        changed |= server.queue.delete_pending(id);
    }
    if changed {
        server.sockets.status(server.queue.remaining());
    }
    Reply::empty(200)
}

/// `GET /history?max_items=N&offset=M`.
fn history(query: &[(String, String)], server: &Server) -> Reply {
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.trim());
    let max_items = match param("max_items").map(str::parse::<usize>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return Reply::text(400, "max_items must be a whole number"),
    };
    let offset = match param("offset").map(str::parse::<i64>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return Reply::text(400, "offset must be a whole number"),
    };
    Reply::json(200, server.queue.history(max_items, offset))
}

/// `POST /history`: `{"clear": true}` or `{"delete": [ids]}`.
fn post_history(req: &Request, server: &Server) -> Reply {
    let Ok(body) = json::parse(&req.body) else { return Reply::text(400, "the body is not JSON") };
    if body.get("clear").is_some_and(truthy) {
        server.queue.clear_history();
    }
    for id in delete_ids(&body) {
        server.queue.delete_history(id);
    }
    Reply::empty(200)
}

/// `GET /system_stats`: memory from /proc/meminfo; a "stub" CPU device with no VRAM.
fn system_stats() -> String {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (total, free) = (kib("MemTotal:") * 1024, kib("MemAvailable:") * 1024);
    format!(
        concat!(
            r#"{{"system":{{"os":"posix","ram_total":{},"ram_free":{},"comfyui_version":"stub","#,
            r#""required_frontend_version":"","python_version":"stub","pytorch_version":"stub","#,
            r#""embedded_python":false,"argv":["comfyui-stub"]}},"devices":[{{"name":"stub","type":"cpu","#,
            r#""index":0,"vram_total":0,"vram_free":0,"torch_vram_total":0,"torch_vram_free":0}}]}}"#
        ),
        total, free
    )
}
