//! `comfyui-stub`: a stand-in ComfyUI server for Ember's tests and demos. It speaks
//! ComfyUI's HTTP API and its WebSocket protocol closely enough for ComfyUI's own API
//! examples (`script_examples/websockets_api_example.py`) and clients to drive it, but runs
//! no model: a prompt's KSampler "samples" by sleeping `STEP_MS` per step, sending the
//! progress and preview messages a real server sends, and SaveImage writes a real PNG of
//! noise seeded from the KSampler's seed. What it models is what a gateway in front of
//! ComfyUI cares about: a model load before listening, one prompt at a time from a FIFO
//! queue, long-lived sockets per client id, interrupts, history, uploads and downloads.
//!
//! # Layout
//! * `main.rs`: settings, the accept loop, HTTP/1.1 keep-alive, responses, shared helpers.
//! * `api.rs`: the HTTP routes (prompt, queue, history, interrupt, system information).
//! * `files.rs`: the data folders, `/view`, `/upload/image`, `/upload/mask`.
//! * `nodes.rs`: the eight node classes the stub knows, and `/object_info`.
//! * `graph.rs`: validation of a prompt graph, and the order its nodes run in.
//! * `queue.rs`: the pending queue, the running prompt, the history.
//! * `exec.rs`: the one worker thread that "runs" prompts and reports on the sockets.
//! * `socket.rs`: `/ws`: the WebSocket clients by client id, and sending to them.
//! * `png.rs`: a PNG encoder (stored deflate blocks) and the noise the images show.
//! * Shared with other stubs by `#[path]`: `../echo/parse.rs` (the request reader),
//!   `../echo/ws.rs` (WebSocket frames, SHA-1, base64), `../llm-stub/json.rs` (JSON).
//!
//! Every route is served at its path and under `/api` (`/prompt`, `/api/prompt`), and
//! every response carries `x-stub-instance: HOSTNAME` so tests can tell replicas apart.
//!
//! Settings: `PORT` (default 8188), `STEP_MS` (time per KSampler step, default 100),
//! `LOAD_MS` (a sleep before listening, the model load; default 0), `DATA_DIR` (where
//! `input/`, `output/` and `temp/` live, default `/comfy`, else `./comfy-data`).
//!
//! Standard library only, so `functions/build.sh` builds it with plain `rustc` into a
//! static binary for a `FROM scratch` image.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod api;
mod exec;
mod files;
mod graph;
#[allow(dead_code)]
#[path = "../llm-stub/json.rs"]
mod json;
mod nodes;
#[path = "../echo/parse.rs"]
mod parse;
mod png;
mod queue;
mod socket;
#[allow(dead_code)]
#[path = "../echo/ws.rs"]
mod ws;

use json::{quote, Json};
use parse::{read_request, ReqError, Request};

/// Cap on the request line plus headers (used by `parse.rs`).
const MAX_HEAD: usize = 64 * 1024;
/// Cap on a chunk-size line (used by `parse.rs`).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Largest body: ComfyUI's default upload limit (100 MiB) plus room for multipart framing.
const MAX_BODY: u64 = 101 * 1024 * 1024;
/// Stack for connection threads: prompt graphs are walked without recursion, but JSON
/// parsing recurses (up to its depth bound).
const THREAD_STACK: usize = 1024 * 1024;

/// What every thread shares: the settings, the data folders, the queue and the sockets.
pub struct Server {
    /// Time per KSampler step.
    pub step: Duration,
    pub dirs: files::Dirs,
    pub queue: queue::Queue,
    pub sockets: socket::Registry,
}

fn main() {
    let setting = |var: &str, default: u64| -> u64 {
        std::env::var(var).map_or(default, |t| {
            t.trim().parse().unwrap_or_else(|_| {
                eprintln!("comfyui-stub: {var} must be a whole number, got {t:?}");
                process::exit(2);
            })
        })
    };
    let port = setting("PORT", 8188);
    let step_ms = setting("STEP_MS", 100);
    let load_ms = setting("LOAD_MS", 0);
    let Ok(port) = u16::try_from(port) else {
        eprintln!("comfyui-stub: PORT must be a port number, got {port}");
        process::exit(2);
    };
    let _ = INSTANCE.set(hostname());
    let dirs = files::Dirs::open();
    // The model load: nothing answers, not even the readiness probe, until it is done.
    thread::sleep(Duration::from_millis(load_ms));
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).unwrap_or_else(|e| {
        eprintln!("comfyui-stub: cannot listen on 0.0.0.0:{port}: {e}");
        process::exit(1);
    });
    println!(
        "comfyui-stub listening on 0.0.0.0:{port}: {step_ms} ms per step, data in {}",
        dirs.base.display()
    );
    let server = Arc::new(Server {
        step: Duration::from_millis(step_ms),
        dirs,
        queue: queue::Queue::new(),
        sockets: socket::Registry::new(),
    });
    let worker = Arc::clone(&server);
    if let Err(e) = thread::Builder::new().name("worker".into()).spawn(move || exec::worker(&worker)) {
        eprintln!("comfyui-stub: cannot start the worker: {e}");
        process::exit(1);
    }
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let server = Arc::clone(&server);
                // Builder rather than thread::spawn, which panics (and with panic=abort,
                // takes every connection down) when threads run out.
                let spawned = thread::Builder::new().stack_size(THREAD_STACK).spawn(move || serve(stream, &server));
                if let Err(e) = spawned {
                    eprintln!("comfyui-stub: cannot start connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("comfyui-stub: accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// This instance's name for `x-stub-instance`.
static INSTANCE: OnceLock<String> = OnceLock::new();

/// This instance's name (the host name), for `x-stub-instance`.
pub fn instance() -> &'static str {
    INSTANCE.get().map_or("unknown", String::as_str)
}

/// Docker writes the container id prefix to /etc/hostname, even in scratch images.
fn hostname() -> String {
    let non_empty = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(non_empty)
        .or_else(|| std::env::var("HOSTNAME").ok().and_then(non_empty))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Serves requests on one connection until the peer closes it, asks to, or upgrades it
/// to a WebSocket (which then owns the connection).
fn serve(stream: TcpStream, server: &Arc<Server>) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut w = BufWriter::new(stream);
    loop {
        let (req, keep) = match read_request(&mut reader, &mut w) {
            Ok(Some(req)) => {
                let keep = req.keep_alive();
                (req, keep)
            }
            Ok(None) | Err(ReqError::Io) => return,
            Err(e) => {
                let (status, message) = match e {
                    ReqError::Bad(why) => (400, format!("bad request: {why}")),
                    ReqError::HeadTooLarge => (431, "request header section too large".into()),
                    _ => (413, "request body too large".into()),
                };
                let _ = send(&mut w, status, &[("content-type", TEXT)], message.as_bytes(), false);
                // Closing with unread input makes the kernel send a reset, which can destroy
                // the answer before the client reads it; so drain briefly first.
                let _ = w.get_ref().shutdown(Shutdown::Write);
                let _ = reader.get_ref().set_read_timeout(Some(Duration::from_secs(1)));
                let _ = io::copy(&mut reader.take(1 << 20), &mut io::sink());
                return;
            }
        };
        if socket::is_upgrade(&req) {
            if let Ok(stream) = w.get_ref().try_clone() {
                socket::session(server, &req, reader, stream);
            }
            return;
        }
        match api::handle(&req, server, &mut w, keep) {
            Ok(true) if keep => continue,
            _ => return,
        }
    }
}

/// The content type of JSON answers (aiohttp's `json_response`).
pub const JSON: &str = "application/json; charset=utf-8";
/// The content type of text answers.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Writes a whole response with a length and the instance header.
pub fn send<W: Write>(w: &mut W, status: u16, headers: &[(&str, &str)], body: &[u8], keep: bool) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status} {}\r\ncontent-length: {}\r\nx-stub-instance: {}\r\n",
        reason(status),
        body.len(),
        instance()
    )?;
    for (k, v) in headers {
        write!(w, "{k}: {v}\r\n")?;
    }
    if !keep {
        w.write_all(b"connection: close\r\n")?;
    }
    w.write_all(b"\r\n")?;
    w.write_all(body)?;
    w.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Milliseconds since the epoch, as ComfyUI stamps its messages.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A random 64-bit number (SplitMix64 over a seed from /dev/urandom and the clock); for
/// ids and names, not for anything secret.
pub fn random_u64() -> u64 {
    static STATE: Mutex<Option<u64>> = Mutex::new(None);
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let s = state.get_or_insert_with(|| {
        let mut seed = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        u64::from_le_bytes(seed) ^ nanos ^ u64::from(process::id()).rotate_left(32)
    });
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mix64(*s)
}

/// SplitMix64's finalizer: a well-spread hash of a 64-bit number.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random version-4 UUID as 32 hex digits (Python's `uuid4().hex`, ComfyUI's client ids).
pub fn uuid4_hex() -> String {
    let (hi, lo) = (random_u64(), random_u64());
    let hi = (hi & !0xf000) | 0x4000;
    let lo = (lo & !(0xc << 60)) | (0x8 << 60);
    format!("{hi:016x}{lo:016x}")
}

/// A random version-4 UUID with dashes (Python's `str(uuid4())`, ComfyUI's prompt ids).
pub fn uuid4() -> String {
    let h = uuid4_hex();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// A JSON number as Python's `json` writes it: whole numbers without a fraction.
pub fn num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e17 {
        format!("{}", n as i64)
    } else if n.is_finite() {
        format!("{n}")
    } else {
        "null".into()
    }
}

/// `v` as JSON text; with `ascii`, every non-ASCII character escaped (Python's default,
/// which PNG text chunks need).
pub fn to_json(v: &Json, ascii: bool) -> String {
    let mut out = String::new();
    write_json(v, ascii, &mut out);
    out
}

fn write_json(v: &Json, ascii: bool, out: &mut String) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Num(n) => out.push_str(&num(*n)),
        Json::Str(s) => out.push_str(&quote_json(s, ascii)),
        Json::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, ascii, out);
            }
            out.push(']');
        }
        Json::Obj(members) => {
            out.push('{');
            for (i, (k, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&quote_json(k, ascii));
                out.push(':');
                write_json(item, ascii, out);
            }
            out.push('}');
        }
    }
}

fn quote_json(s: &str, ascii: bool) -> String {
    if !ascii || s.is_ascii() {
        return quote(s);
    }
    let mut out = String::new();
    for c in quote(s).chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// Strings as a JSON array.
pub fn str_list<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s.as_ref())).collect();
    format!("[{}]", quoted.join(","))
}
