//! `batch-stub`: a stand-in for a model served in batches, for Ember's batch-mode tests
//! and benchmark. Each call costs a fixed time whatever its size (`FIXED_MS`, default 300:
//! what loading weights into a compute pass costs) plus a little per item (`ITEM_MS`,
//! default 2), and calls run one at a time, as on one GPU: so 32 inputs in one call cost
//! about 1/25 of 32 calls.
//!
//! `POST` any path with one JSON input, or a JSON array of inputs (Ember's batch mode
//! sends `Ember-Batch: N` with an array of N). Each input's result is
//! `{"index":I,"batch":N,"input":INPUT,"instance":HOSTNAME}`; one input gets its result,
//! an array gets an array of results in order. An input that is an object with
//! `"fail": true` makes the whole call answer 400 (a bad input refuses the batch). A
//! malformed body, or an array whose length is not `Ember-Batch`, is 400.
//! `GET /healthz` is `ok`; `GET /stats` is `{"calls":C,"items":I}` so far.
//!
//! Standard library only (its request reader is `functions/echo`'s, its JSON parser
//! `functions/llm-stub`'s), built by `functions/build.sh` into a static binary for a
//! `FROM scratch` image. `PORT` (default 8080).

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[path = "../llm-stub/json.rs"]
#[allow(dead_code)]
mod json;
#[path = "../echo/parse.rs"]
mod parse;

use parse::{read_request, ReqError, Request};

const MAX_HEAD: usize = 64 * 1024;
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_BODY: u64 = 64 * 1024 * 1024;

struct Stub {
    fixed: Duration,
    per_item: Duration,
    hostname: String,
    /// The one compute pass at a time.
    gpu: Mutex<()>,
    calls: AtomicU64,
    items: AtomicU64,
}

fn main() {
    let setting = |var: &str, default: u64| -> u64 {
        std::env::var(var).ok().map_or(default, |t| {
            t.trim().parse().unwrap_or_else(|_| {
                eprintln!("batch-stub: {var} must be a whole number, got {t:?}");
                process::exit(2);
            })
        })
    };
    let stub = Arc::new(Stub {
        fixed: Duration::from_millis(setting("FIXED_MS", 300)),
        per_item: Duration::from_millis(setting("ITEM_MS", 2)),
        hostname: std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        gpu: Mutex::new(()),
        calls: AtomicU64::new(0),
        items: AtomicU64::new(0),
    });
    let port = setting("PORT", 8080);
    let Ok(port) = u16::try_from(port) else {
        eprintln!("batch-stub: PORT must be a port number, got {port}");
        process::exit(2);
    };
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).unwrap_or_else(|e| {
        eprintln!("batch-stub: cannot listen on 0.0.0.0:{port}: {e}");
        process::exit(1);
    });
    println!(
        "batch-stub listening on 0.0.0.0:{port}: {} ms per call, {} ms per item",
        stub.fixed.as_millis(),
        stub.per_item.as_millis()
    );
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let stub = Arc::clone(&stub);
                if let Err(e) = thread::Builder::new().spawn(move || serve(stream, &stub)) {
                    eprintln!("batch-stub: cannot start connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("batch-stub: accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Serves requests on one connection until the peer closes it or asks to.
fn serve(stream: TcpStream, stub: &Stub) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut w = BufWriter::new(stream);
    loop {
        let req = match read_request(&mut reader, &mut w) {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReqError::Io) => return,
            Err(e) => {
                let why = match e {
                    ReqError::Bad(why) => why,
                    ReqError::HeadTooLarge => "request head too large",
                    _ => "request body too large",
                };
                let _ = send(&mut w, 400, &format!("{{\"error\":{}}}", json::quote(why)), false);
                let _ = w.get_ref().shutdown(Shutdown::Write);
                return;
            }
        };
        let keep = req.keep_alive();
        let (status, body) = handle(&req, stub);
        if send(&mut w, status, &body, keep).is_err() || !keep {
            return;
        }
    }
}

fn handle(req: &Request, stub: &Stub) -> (u16, String) {
    let path = req.target.split('?').next().unwrap_or("/");
    match (req.method.as_str(), path) {
        ("GET", "/healthz") => (200, "\"ok\"".into()),
        ("GET", "/stats") => (
            200,
            format!(
                "{{\"calls\":{},\"items\":{}}}",
                stub.calls.load(Ordering::Relaxed),
                stub.items.load(Ordering::Relaxed)
            ),
        ),
        ("POST", _) => match run(req, stub) {
            Ok(body) => (200, body),
            Err(why) => (400, format!("{{\"error\":{}}}", json::quote(&why))),
        },
        _ => (405, "{\"error\":\"POST an input or an array of inputs\"}".into()),
    }
}

/// One call: parses the inputs, spends the compute time, answers the results.
fn run(req: &Request, stub: &Stub) -> Result<String, String> {
    let doc = json::parse(&req.body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let announced = match req.header("ember-batch") {
        Some(n) => Some(n.trim().parse::<usize>().map_err(|_| format!("Ember-Batch `{n}` is not a number"))?),
        None => None,
    };
    let batched = announced.is_some() || matches!(doc, json::Json::Arr(_));
    let items: Vec<&[u8]> = if batched { elements(&req.body) } else { vec![trim(&req.body)] };
    if let (Some(n), json::Json::Arr(parsed)) = (announced, &doc) {
        if parsed.len() != n || items.len() != n {
            return Err(format!("Ember-Batch says {n} inputs, the array has {}", parsed.len()));
        }
    } else if announced.is_some() {
        return Err("Ember-Batch was sent with a body that is not an array".into());
    }
    let parsed: Vec<&json::Json> = match &doc {
        json::Json::Arr(all) if batched => all.iter().collect(),
        one => vec![one],
    };
    if let Some(i) = parsed.iter().position(|p| p.get("fail").and_then(json::Json::as_bool) == Some(true)) {
        return Err(format!("input {i} asked to fail"));
    }
    let n = items.len();
    {
        let _pass = stub.gpu.lock().unwrap_or_else(|e| e.into_inner());
        thread::sleep(stub.fixed + stub.per_item * n as u32);
    }
    stub.calls.fetch_add(1, Ordering::Relaxed);
    stub.items.fetch_add(n as u64, Ordering::Relaxed);
    let host = json::quote(&stub.hostname);
    let results: Vec<String> = items
        .iter()
        .enumerate()
        .map(|(i, input)| {
            format!(
                "{{\"index\":{i},\"batch\":{n},\"input\":{},\"instance\":{host}}}",
                String::from_utf8_lossy(input)
            )
        })
        .collect();
    Ok(if batched { format!("[{}]", results.join(",")) } else { results.concat() })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end]
}

/// The raw text of each element of a JSON array already known to be valid.
fn elements(doc: &[u8]) -> Vec<&[u8]> {
    let doc = trim(doc);
    let mut out = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 1usize);
    for (i, &c) in doc.iter().enumerate() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    let item = trim(&doc[start..i]);
                    if !item.is_empty() {
                        out.push(item);
                    }
                }
            }
            b',' if depth == 1 => {
                out.push(trim(&doc[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out
}

fn send<W: Write>(w: &mut W, status: u16, body: &str, keep: bool) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Method Not Allowed",
    };
    write!(
        w,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        if keep { "" } else { "connection: close\r\n" }
    )?;
    w.flush()
}
