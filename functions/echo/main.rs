//! `echo`: the reference function Ember's tests and demos run behind the gateway.
//!
//! It is a deliberately dependency-free HTTP/1.1 server (standard library only) so a
//! bare `rustc` can build it into a static binary that ships in a `FROM scratch` image;
//! see `functions/build.sh`. Each route exists to exercise one gateway behaviour:
//! cold starts, crashes, slow and streamed responses, keep-alive and header forwarding.
//!
//! Routes (matched on the path only; the query string is ignored unless noted):
//!
//! * `GET /healthz` - 200 `ok`.
//! * `/status/CODE` - answers with CODE (200-599), body `status CODE`; anything else is
//!   400 `bad status`.
//! * `/sleep/MS` - waits MS milliseconds (at most 600000), then answers like echo.
//! * `/stream/N?interval_ms=X` - 200 with a chunked body of N lines `chunk I\n`
//!   (N at most 10000), flushed one by one, X milliseconds apart (default 100).
//! * `/exit?code=N` - 200 `exiting`, then the process says so on stderr and exits with
//!   code N (default 0).
//! * `/print/TEXT`, `/eprint/TEXT` - TEXT (the rest of the path, as sent) is written as
//!   one line to stdout, or stderr, then 200 `printed`: output on demand, for log tests.
//! * `GET /ws` with `Upgrade: websocket` - a WebSocket echo (`ws.rs`): 101, then text and
//!   binary frames come back as sent, ping gets pong, close gets close. Without the
//!   upgrade, 426.
//! * anything else, any method - echo: 200 with the request body as the response body,
//!   plus `x-echo-method`, `x-echo-uri`, `x-echo-host`, one `x-echo-h-NAME` per `x-*` and
//!   `ember-*` request header and for `authorization` (so tests see which credentials
//!   and invocation ids reach a function) and, when `GREETING` is set, `x-greeting`.
//!
//! Flags: `--crash` exits with code 3 before listening; `--delay-start MS` sleeps before
//! binding the port, to simulate a slow cold start.
//! Environment: `PORT` (default 8080), `GREETING`, `HOSTNAME` (if /etc/hostname is absent).

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

mod parse;
mod ws;

use parse::{read_request, ReqError, Request};

/// Cap on the request line plus headers; beyond it we answer 431.
const MAX_HEAD: usize = 64 * 1024;
/// Cap on a single chunk-size line (the size plus any chunk extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Bodies are buffered in memory to be echoed, so bound them; beyond it we answer 413.
const MAX_BODY: u64 = 64 * 1024 * 1024;
/// How much unread input we discard before closing a connection after an error.
const LINGER_DRAIN: u64 = 1024 * 1024;
const MAX_SLEEP_MS: u64 = 600_000;
const MAX_STREAM_CHUNKS: u64 = 10_000;
const USAGE: &str = "usage: echo [--crash] [--delay-start MS]";

struct Config {
    hostname: String,
    greeting: Option<String>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        let headers = vec![("content-type".to_string(), "text/plain".to_string())];
        Response { status, headers, body: body.into().into_bytes() }
    }
}

fn main() {
    let mut crash = false;
    let mut delay_ms = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--crash" => crash = true,
            "--delay-start" => match args.next().and_then(|v| v.parse().ok()) {
                Some(ms) => delay_ms = ms,
                None => usage_exit(),
            },
            _ => usage_exit(),
        }
    }
    if crash {
        eprintln!("echo: crashing at start as asked (--crash)");
        process::exit(3);
    }
    thread::sleep(Duration::from_millis(delay_ms));

    let port = match std::env::var("PORT") {
        Err(_) => 8080,
        Ok(p) => p.trim().parse::<u16>().unwrap_or_else(|_| {
            eprintln!("echo: PORT must be a port number, got {p:?}");
            process::exit(2);
        }),
    };
    // A SocketAddr rather than "0.0.0.0:port" keeps name resolution (and with it glibc's
    // NSS, which a static binary cannot load) out of the picture.
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).unwrap_or_else(|e| {
        eprintln!("echo: cannot listen on 0.0.0.0:{port}: {e}");
        process::exit(1);
    });
    let greeting = std::env::var("GREETING").ok().filter(|g| !g.contains(['\r', '\n']));
    let config = Arc::new(Config { hostname: hostname(), greeting });
    println!("echo listening on 0.0.0.0:{port}");

    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let config = Arc::clone(&config);
                // Builder instead of thread::spawn: spawn panics when threads run out, and
                // with panic=abort that would take every other connection down with it.
                if let Err(e) = thread::Builder::new().spawn(move || serve(stream, &config)) {
                    eprintln!("echo: cannot start connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("echo: accept failed: {e}");
                // Typically EMFILE; back off rather than spin on the same error.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn usage_exit() -> ! {
    eprintln!("{USAGE}");
    process::exit(2);
}

/// Docker writes the container id prefix to /etc/hostname even in scratch images, which
/// lets tests tell replicas apart.
fn hostname() -> String {
    let non_empty = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(non_empty)
        .or_else(|| std::env::var("HOSTNAME").ok().and_then(non_empty))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Serves requests on one connection until the peer closes it or asks us to.
fn serve(stream: TcpStream, config: &Config) {
    // Responses are small and the peer keeps the connection: without NODELAY, Nagle would
    // hold a response back waiting for the ACK of the previous one.
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = BufWriter::new(stream);
    loop {
        let failure = match read_request(&mut reader, &mut writer) {
            Ok(Some(req)) if is_websocket(&req) => {
                let key = req.header("sec-websocket-key").unwrap_or_default();
                let _ = ws::session(key, &mut reader, &mut writer);
                return;
            }
            Ok(Some(req)) => match handle(req, config, &mut writer) {
                Ok(true) => continue,
                _ => return,
            },
            Ok(None) | Err(ReqError::Io) => return,
            Err(ReqError::Bad(why)) => Response::text(400, format!("bad request: {why}")),
            Err(ReqError::HeadTooLarge) => Response::text(431, "request header section too large"),
            Err(ReqError::BodyTooLarge) => Response::text(413, "request body too large"),
        };
        // After a malformed request we no longer know where the next one starts, so close.
        let _ = send(&mut writer, failure, false, Some("close"));
        // Closing with unread input makes the kernel send a reset, which can destroy the
        // error response before the client reads it; so drain briefly first.
        let _ = writer.get_ref().shutdown(Shutdown::Write);
        let _ = reader.get_ref().set_read_timeout(Some(Duration::from_secs(1)));
        let _ = io::copy(&mut reader.take(LINGER_DRAIN), &mut io::sink());
        return;
    }
}

/// Whether a request opens the WebSocket echo: `GET /ws` asking to upgrade.
fn is_websocket(req: &Request) -> bool {
    let path = req.target.split('?').next().unwrap_or_default();
    path == "/ws"
        && req.method == "GET"
        && ws::wants_upgrade(req.header("upgrade"), req.header("sec-websocket-key"))
}

/// Answers one request; the result says whether the connection may carry another.
fn handle<W: Write>(req: Request, config: &Config, w: &mut W) -> io::Result<bool> {
    let keep_alive = req.keep_alive();
    let conn = connection_header(keep_alive, req.http10);
    let head_only = req.method == "HEAD";
    let path = req.target.split('?').next().unwrap_or_default();

    let resp = if path == "/healthz" && (req.method == "GET" || head_only) {
        Response::text(200, "ok")
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code.parse::<u16>() {
            Ok(code @ 200..=599) => Response::text(code, format!("status {code}")),
            _ => Response::text(400, "bad status"),
        }
    } else if let Some(ms) = path.strip_prefix("/sleep/") {
        match ms.parse::<u64>() {
            Ok(ms) => {
                thread::sleep(Duration::from_millis(ms.min(MAX_SLEEP_MS)));
                echo(req, config)
            }
            Err(_) => Response::text(400, "bad sleep"),
        }
    } else if let Some(count) = path.strip_prefix("/stream/") {
        return stream(&req, count, keep_alive, w);
    } else if let Some(size) = path.strip_prefix("/bytes/") {
        return bytes(&req, size, keep_alive, w);
    } else if path == "/ws" {
        Response::text(426, "upgrade to websocket")
    } else if path == "/exit" {
        let code = query_param(&req.target, "code").and_then(|c| c.parse().ok()).unwrap_or(0);
        // Finish the answer first so the caller sees success rather than a reset.
        let _ = send(w, Response::text(200, "exiting"), head_only, Some("close"));
        eprintln!("echo: exiting with code {code} as asked (/exit)");
        process::exit(code);
    } else if let Some(text) = path.strip_prefix("/print/") {
        println!("{text}");
        Response::text(200, "printed")
    } else if let Some(text) = path.strip_prefix("/eprint/") {
        eprintln!("{text}");
        Response::text(200, "printed")
    } else {
        echo(req, config)
    };
    send(w, resp, head_only, conn)?;
    Ok(keep_alive)
}

fn echo(req: Request, config: &Config) -> Response {
    let content_type = req.header("content-type").unwrap_or("application/octet-stream");
    let mut headers = vec![
        ("content-type".to_string(), content_type.to_string()),
        ("x-echo-method".to_string(), req.method.clone()),
        ("x-echo-uri".to_string(), req.target.clone()),
        ("x-echo-host".to_string(), config.hostname.clone()),
    ];
    let echoed = |n: &str| n.starts_with("x-") || n.starts_with("ember-") || n == "authorization";
    for (name, value) in req.headers.iter().filter(|(n, _)| echoed(n)) {
        headers.push((format!("x-echo-h-{name}"), value.clone()));
    }
    if let Some(greeting) = &config.greeting {
        headers.push(("x-greeting".to_string(), greeting.clone()));
    }
    Response { status: 200, headers, body: req.body }
}

fn stream<W: Write>(req: &Request, count: &str, keep_alive: bool, w: &mut W) -> io::Result<bool> {
    let interval = query_param(&req.target, "interval_ms").map_or(Ok(100), str::parse::<u64>);
    let (count, interval) = match (count.parse::<u64>(), interval) {
        (Ok(n), Ok(ms)) => (n.min(MAX_STREAM_CHUNKS), Duration::from_millis(ms.min(MAX_SLEEP_MS))),
        _ => {
            let conn = connection_header(keep_alive, req.http10);
            send(w, Response::text(400, "bad stream request"), req.method == "HEAD", conn)?;
            return Ok(keep_alive);
        }
    };
    // HTTP/1.0 has no chunked encoding; there the end of the body is the connection closing.
    let chunked = !req.http10;
    let mut headers = vec![("content-type".to_string(), "text/plain".to_string())];
    if chunked {
        headers.push(("transfer-encoding".to_string(), "chunked".to_string()));
    }
    let conn = if chunked { connection_header(keep_alive, false) } else { Some("close") };
    write_head(w, 200, &headers, conn)?;
    w.flush()?;
    if req.method == "HEAD" {
        return Ok(chunked && keep_alive);
    }
    for i in 0..count {
        if i > 0 {
            thread::sleep(interval);
        }
        let line = format!("chunk {i}\n");
        if chunked {
            write!(w, "{:x}\r\n{line}\r\n", line.len())?;
        } else {
            w.write_all(line.as_bytes())?;
        }
        // Flush every chunk: the point of this route is that they arrive over time.
        w.flush()?;
    }
    if chunked {
        w.write_all(b"0\r\n\r\n")?;
    }
    w.flush()?;
    Ok(chunked && keep_alive)
}

/// Largest `/bytes/N` download.
const MAX_BYTES: u64 = 1 << 30;

/// `/bytes/N`: N bytes of a repeating pattern (byte i is `i % 251`), with a
/// content-length, for large downloads whose every byte a client can check.
fn bytes<W: Write>(req: &Request, size: &str, keep_alive: bool, w: &mut W) -> io::Result<bool> {
    let conn = connection_header(keep_alive, req.http10);
    let Ok(size) = size.parse::<u64>() else {
        send(w, Response::text(400, "bad size"), req.method == "HEAD", conn)?;
        return Ok(keep_alive);
    };
    let size = size.min(MAX_BYTES);
    let headers = vec![
        ("content-type".to_string(), "application/octet-stream".to_string()),
        ("content-length".to_string(), size.to_string()),
    ];
    write_head(w, 200, &headers, conn)?;
    if req.method != "HEAD" {
        let block: Vec<u8> = (0..251u64 * 256).map(|i| (i % 251) as u8).collect();
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            w.write_all(&block[..n])?;
            left -= n as u64;
        }
    }
    w.flush()?;
    Ok(keep_alive)
}

fn query_param<'a>(target: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// The `Connection` header to send, if the default for the version is not what we mean.
fn connection_header(keep_alive: bool, http10: bool) -> Option<&'static str> {
    match (keep_alive, http10) {
        (false, _) => Some("close"),
        (true, true) => Some("keep-alive"),
        (true, false) => None,
    }
}

fn send<W: Write>(
    w: &mut W,
    mut resp: Response,
    head_only: bool,
    conn: Option<&str>,
) -> io::Result<()> {
    // 204 and 304 never carry a body, so a length would only mislead the client.
    let bodyless = matches!(resp.status, 204 | 304);
    if !bodyless {
        resp.headers.push(("content-length".to_string(), resp.body.len().to_string()));
    }
    write_head(w, resp.status, &resp.headers, conn)?;
    if !head_only && !bodyless {
        w.write_all(&resp.body)?;
    }
    w.flush()
}

fn write_head<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    conn: Option<&str>,
) -> io::Result<()> {
    write!(w, "HTTP/1.1 {status} {}\r\n", reason(status))?;
    for (name, value) in headers {
        write!(w, "{name}: {value}\r\n")?;
    }
    if let Some(conn) = conn {
        write!(w, "connection: {conn}\r\n")?;
    }
    w.write_all(b"\r\n")
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Content Too Large",
        418 => "I'm a teapot",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        // The phrase is informational only (RFC 9112 section 4); the class is enough.
        _ if status < 300 => "Success",
        _ if status < 400 => "Redirection",
        _ if status < 500 => "Client Error",
        _ => "Server Error",
    }
}

