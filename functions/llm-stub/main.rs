//! `llm-stub`: a stand-in OpenAI-compatible model server, for Ember's tests, demos and
//! routing benchmark. It generates no sense: its text is words picked by a hash of the
//! prompt, the same prompt always giving the same words. What it does model is the cost
//! structure of a real server (vLLM, llama.cpp) that routing and scale-to-zero care about:
//!
//! * a load time before it listens (the model load, the cold start);
//! * a prefill time per prompt byte **not** already in its prefix cache (each instance its
//!   own, as a KV cache): an LRU of prompt prefixes where prompts sharing a prefix share
//!   an entry (see `Cache`); the longest common prefix with any entry is free;
//! * a decode time per generated token, tokens streamed as they are "decoded".
//!
//! It reports what it found cached, as OpenAI does in `usage.prompt_tokens_details.
//! cached_tokens` (a token is 4 bytes here), and in `usage.stub`: `prompt_bytes`,
//! `cached_bytes`, `ttft_us` (the simulated time to first token: prefill plus one decode)
//! and `instance` (also in the `x-stub-instance` header), so routing quality can be
//! measured from outside.
//!
//! Routes: `GET /healthz`; `GET /v1/models`; `POST /v1/chat/completions` (`messages`,
//! `max_tokens` or `max_completion_tokens`, default 16, `stream`, `stream_options.
//! include_usage`); `POST /v1/completions` (`prompt`, the same options); `POST
//! /v1/embeddings` (`input`, a string or strings; `encoding_format` `float` or `base64`,
//! little-endian f32, which the official Python client asks for). A model it does not
//! serve is 404 `model_not_found`; a malformed body 400; errors in OpenAI's shape.
//!
//! Settings (a flag wins over the variable): `--load-ms N` / `LOAD_MS`,
//! `--prefill-us-per-byte N` / `PREFILL_US_PER_BYTE`, `--decode-us-per-token N` /
//! `DECODE_US_PER_TOKEN`, `--cache-entries N` / `CACHE_ENTRIES` (prefixes held, default 64), `MODELS`
//! (comma-separated ids served, default `stub`), `PORT` (default 8080).
//!
//! Standard library only, like `functions/echo` (whose request reader it shares), so
//! `functions/build.sh` builds it with plain `rustc` into a static binary for a `FROM
//! scratch` image.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod api;
mod json;
#[path = "../echo/parse.rs"]
mod parse;

use parse::{read_request, ReqError, Request};

const MAX_HEAD: usize = 64 * 1024;
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_BODY: u64 = 16 * 1024 * 1024;
const USAGE: &str = "usage: llm-stub [--load-ms N] [--prefill-us-per-byte N] [--decode-us-per-token N] [--cache-entries N]";

/// What the server was started with.
pub struct Config {
    pub models: Vec<String>,
    pub prefill_us_per_byte: u64,
    pub decode_us_per_token: u64,
    pub hostname: String,
    pub cache: Mutex<Cache>,
    pub ids: AtomicU64,
}

/// The prefix cache, a rough model of a KV cache with prefix sharing: up to `capacity`
/// prompt prefixes, least recently used first out. A prompt that shares at least a block
/// ([`BLOCK`] bytes) with an entry extends that entry (its shared blocks are reused, the
/// rest of the old entry's tail is dropped) and makes it the most recent; a prompt wholly
/// inside an entry only makes it the most recent; any other prompt takes an entry of its own.
pub struct Cache {
    entries: Vec<Vec<u8>>,
    capacity: usize,
}

/// The smallest shared prefix that counts as reusing an entry (vLLM's blocks are 16
/// tokens, about 64 bytes).
const BLOCK: usize = 64;

impl Cache {
    /// Bytes of `prompt` already cached (its longest common prefix with an entry, cut to
    /// a character boundary); then remembers `prompt` as the most recent.
    pub fn lookup_and_insert(&mut self, prompt: &str) -> usize {
        let p = prompt.as_bytes();
        let mut best = (0, None);
        for (i, e) in self.entries.iter().enumerate() {
            let common = e.iter().zip(p).take_while(|(a, b)| a == b).count();
            if common > best.0 {
                best = (common, Some(i));
            }
        }
        let (mut cached, supplier) = best;
        while cached > 0 && !prompt.is_char_boundary(cached) {
            cached -= 1;
        }
        match supplier {
            // Wholly inside an entry: that entry is used, and kept whole.
            Some(i) if cached == p.len() => {
                let entry = self.entries.remove(i);
                self.entries.push(entry);
                return cached;
            }
            Some(i) if cached >= BLOCK => {
                self.entries.remove(i);
            }
            _ if self.entries.len() >= self.capacity && !self.entries.is_empty() => {
                self.entries.remove(0);
            }
            _ => {}
        }
        if self.capacity > 0 {
            self.entries.push(p.to_vec());
        }
        cached
    }
}

fn main() {
    // Flags first, then the variables, then the defaults.
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let known = ["--load-ms", "--prefill-us-per-byte", "--decode-us-per-token", "--cache-entries"];
        match args.next() {
            Some(value) if known.contains(&flag.as_str()) => flags.push((flag, value)),
            _ => usage_exit(),
        }
    }
    let setting = |flag: &str, var: &str, default: u64| -> u64 {
        let text = flags
            .iter()
            .find(|(f, _)| f == flag)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(var).ok());
        text.map_or(default, |t| {
            t.trim().parse().unwrap_or_else(|_| {
                eprintln!("llm-stub: {flag} / {var} must be a whole number, got {t:?}");
                process::exit(2);
            })
        })
    };
    let load_ms = setting("--load-ms", "LOAD_MS", 0);
    let prefill = setting("--prefill-us-per-byte", "PREFILL_US_PER_BYTE", 0);
    let decode = setting("--decode-us-per-token", "DECODE_US_PER_TOKEN", 0);
    let entries = setting("--cache-entries", "CACHE_ENTRIES", 64) as usize;
    let port = setting("PORT", "PORT", 8080);
    let models: Vec<String> = std::env::var("MODELS")
        .unwrap_or_else(|_| "stub".into())
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    thread::sleep(Duration::from_millis(load_ms));
    let Ok(port) = u16::try_from(port) else { usage_exit() };
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).unwrap_or_else(|e| {
        eprintln!("llm-stub: cannot listen on 0.0.0.0:{port}: {e}");
        process::exit(1);
    });
    let config = Arc::new(Config {
        models,
        prefill_us_per_byte: prefill,
        decode_us_per_token: decode,
        hostname: hostname(),
        cache: Mutex::new(Cache { entries: Vec::new(), capacity: entries }),
        ids: AtomicU64::new(1),
    });
    println!(
        "llm-stub listening on 0.0.0.0:{port}: models {:?}, prefill {prefill} us/byte, decode {decode} us/token, cache {entries} prompts",
        config.models
    );
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let config = Arc::clone(&config);
                if let Err(e) = thread::Builder::new().spawn(move || serve(stream, &config)) {
                    eprintln!("llm-stub: cannot start connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("llm-stub: accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn usage_exit() -> ! {
    eprintln!("{USAGE}");
    process::exit(2);
}

fn hostname() -> String {
    let non_empty = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(non_empty)
        .or_else(|| std::env::var("HOSTNAME").ok().and_then(non_empty))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Seconds since the epoch, for `created`.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Serves requests on one connection until the peer closes it or asks to.
fn serve(stream: TcpStream, config: &Config) {
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
                let _ = api::send_error(&mut w, status, "bad_request", &message, false);
                // Closing with unread input makes the kernel send a reset, which can destroy
                // the answer before the client reads it; so drain briefly first.
                let _ = w.get_ref().shutdown(Shutdown::Write);
                let _ = reader.get_ref().set_read_timeout(Some(Duration::from_secs(1)));
                let _ = io::copy(&mut reader.take(1 << 20), &mut io::sink());
                return;
            }
        };
        match api::handle(&req, config, &mut w, keep) {
            Ok(true) if keep => continue,
            _ => return,
        }
    }
}

/// Writes a whole response with a length.
pub fn send<W: Write>(w: &mut W, status: u16, headers: &[(&str, &str)], body: &[u8], keep: bool) -> io::Result<()> {
    write!(w, "HTTP/1.1 {status} {}\r\ncontent-length: {}\r\n", reason(status), body.len())?;
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
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Unknown",
    }
}
