//! `ember-shim`: turns a plain program into an Ember function. It serves HTTP on `$PORT`
//! and runs a command once per request, the way OpenFaaS's classic watchdog runs its
//! `fprocess`:
//!
//! - the request body goes to the command's stdin; the method, path, query and headers
//!   to its environment as `EMBER_METHOD`, `EMBER_PATH`, `EMBER_QUERY` and
//!   `EMBER_HEADER_<NAME>` (upper case, `-` as `_`); the shim's own environment
//!   (`PORT`, the manifest's `env`) is inherited;
//! - exit code 0 answers 200 with stdout as the body (`--content-type`, default
//!   `application/octet-stream`); any other answers 500 with the end of stderr; past
//!   `--timeout` the command's process group is killed and the answer is 504;
//! - at most `--concurrency` commands run at once; one more request answers 429 with
//!   `Retry-After` (the gateway's queue is where requests wait);
//! - stderr goes to the container log, each line prefixed with the request's id;
//! - `GET /healthz` answers 200 without running anything: Ember's readiness probe;
//! - on SIGTERM it stops accepting, lets running commands finish within `--grace`, then
//!   kills what is left and exits. As PID 1 of a container it also reaps orphans.
//!
//! Std only, so plain `rustc` builds it into a static binary for a `FROM scratch` image
//! (`functions/build.sh`). A thread per connection; commands are few and heavy.
//!
//! # Layout
//! - `config.rs`: flags and their environment variables;
//! - `http.rs`: request heads and bodies, whole and chunked responses;
//! - `slots.rs`: the concurrency limit;
//! - `process.rs`: starting, watching and killing one command;
//! - `run.rs`: answering a request from a command's run, buffered or streamed;
//! - `sys.rs`: the POSIX calls std lacks (process groups, signals, init).

mod config;
mod http;
mod process;
mod run;
mod slots;
mod sys;

use std::io::{self, BufReader, Read};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use config::{Config, USAGE};
use http::Head;
use slots::Slots;

/// How much unread input is drained before closing after a refusal, so the kernel does
/// not answer it with a reset that destroys the refusal.
const LINGER_DRAIN: u64 = 1024 * 1024;
/// What a 429 asks the client to wait, in seconds.
const RETRY_AFTER: &str = "1";
/// After the grace, how long killed commands get to be answered for.
const AFTER_KILL: Duration = Duration::from_secs(2);

struct Shared {
    config: Config,
    slots: Slots,
    next_id: AtomicU64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let before_command = args.iter().take_while(|a| *a != "--");
    if before_command
        .into_iter()
        .any(|a| a == "-h" || a == "--help")
    {
        println!("{USAGE}");
        return;
    }
    let config = match Config::parse(&args, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("ember-shim: {e}");
            }
            eprintln!("ember-shim: see `ember-shim --help`");
            std::process::exit(2);
        }
    };
    if std::process::id() == 1 {
        sys::become_init();
    }
    let listener = match TcpListener::bind(("0.0.0.0", config.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ember-shim: cannot listen on port {}: {e}", config.port);
            std::process::exit(1);
        }
    };
    sys::stop_on_signal(&listener);
    eprintln!(
        "ember-shim: listening on 0.0.0.0:{}; each request runs `{}` ({}, concurrency {}, timeout {:?})",
        config.port,
        config.command.join(" "),
        if config.stream { "streamed" } else { "buffered" },
        config.concurrency,
        config.timeout,
    );
    let shared = Arc::new(Shared {
        slots: Slots::new(config.concurrency),
        config,
        next_id: AtomicU64::new(1),
    });
    for conn in listener.incoming() {
        if sys::stopping() {
            break;
        }
        match conn {
            Ok(stream) => {
                let shared = shared.clone();
                let spawned = thread::Builder::new().spawn(move || serve(stream, &shared));
                if let Err(e) = spawned {
                    eprintln!("ember-shim: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("ember-shim: accept failed: {e}");
                // Out of descriptors, most likely: give running requests a moment.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    drain(&shared);
}

/// After SIGTERM: waits for running commands within the grace, then kills what is left.
fn drain(shared: &Shared) {
    let grace = shared.config.grace;
    eprintln!("ember-shim: stopping; running commands have {grace:?} to finish");
    if !shared.slots.wait_idle(Instant::now() + grace) {
        let killed = shared.slots.kill_all();
        eprintln!("ember-shim: the grace is over; killed {killed} command(s)");
        shared.slots.wait_idle(Instant::now() + AFTER_KILL);
    }
    eprintln!("ember-shim: stopped");
}

/// Serves requests on one connection until the client closes it or a request ends it.
fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    loop {
        let head = match http::read_head(&mut reader) {
            Ok(Some(head)) => head,
            Ok(None) | Err(http::Error::Gone) => return,
            Err(e) => {
                refuse(
                    &stream,
                    &mut reader,
                    e.status().unwrap_or(400),
                    &[],
                    &bad(&e),
                );
                return;
            }
        };
        if !handle(&stream, &mut reader, head, shared) {
            return;
        }
    }
}

fn bad(e: &http::Error) -> String {
    match e {
        http::Error::Bad(why) => format!("bad request: {why}"),
        http::Error::HeadTooLarge => format!("the request head is over {} bytes", http::MAX_HEAD),
        http::Error::BodyTooLarge => "the request body is over --max-body".into(),
        http::Error::Gone => String::new(),
    }
}

/// Answers one request; whether the connection may carry another.
fn handle(
    stream: &TcpStream,
    reader: &mut BufReader<TcpStream>,
    head: Head,
    shared: &Shared,
) -> bool {
    let config = &shared.config;
    let close = !head.keep_alive() || sys::stopping();
    if head.path == "/healthz" && (head.method == "GET" || head.method == "HEAD") {
        if let Err(e) = http::read_body(reader, &head, 0) {
            return refuse(stream, reader, 400, &[], &bad(&e));
        }
        let (status, body) = if sys::stopping() {
            (503, "stopping")
        } else {
            (200, "ok")
        };
        let mut w = stream;
        let headers = [("content-type", "text/plain")];
        let sent = http::write_response(
            &mut w,
            status,
            &headers,
            body.as_bytes(),
            close,
            head.method == "HEAD",
        );
        return sent.is_ok() && !close;
    }
    if sys::stopping() {
        return refuse(
            stream,
            reader,
            503,
            &[],
            "the function is stopping; retry elsewhere",
        );
    }
    // Refused bodies are checked before a slot is taken: a refusal drains the request for
    // a while, and must not hold a slot (the client's next request would get 429).
    let too_large = match head.content_length() {
        Ok(Some(n)) => n > config.max_body,
        Ok(None) => false,
        Err(e) => return refuse(stream, reader, 400, &[], &bad(&e)),
    };
    if too_large {
        let why = format!(
            "the request body is over --max-body ({} bytes)",
            config.max_body
        );
        return refuse(stream, reader, 413, &[], &why);
    }
    let Some(mut slot) = shared.slots.try_take() else {
        let why = format!(
            "busy: {n} command(s) already running, the most this instance runs at once (--concurrency {n})",
            n = config.concurrency
        );
        eprintln!("ember-shim: {} {} -> 429 (busy)", head.method, head.path);
        return refuse(stream, reader, 429, &[("retry-after", RETRY_AFTER)], &why);
    };
    if head.expects_continue() {
        let mut w = stream;
        if io::Write::write_all(&mut w, b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return false;
        }
    }
    let body = match http::read_body(reader, &head, config.max_body) {
        Ok(body) => body,
        Err(http::Error::Gone) => return false,
        Err(e) => {
            drop(slot);
            let why = match e {
                http::Error::BodyTooLarge => format!(
                    "the request body is over --max-body ({} bytes)",
                    config.max_body
                ),
                ref e => bad(e),
            };
            return refuse(stream, reader, e.status().unwrap_or(400), &[], &why);
        }
    };
    let call = run::Call {
        id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        head: &head,
        body,
        conn: stream,
        close,
    };
    run::answer(config, call, &mut slot)
}

/// Answers `status` with `message` and closes the connection, draining what the client
/// still sends first so that the answer is not lost to a reset. Always `false`.
fn refuse(
    stream: &TcpStream,
    reader: &mut BufReader<TcpStream>,
    status: u16,
    headers: &[(&str, &str)],
    message: &str,
) -> bool {
    let mut all = vec![("content-type", "text/plain; charset=utf-8")];
    all.extend_from_slice(headers);
    let mut body = message.as_bytes().to_vec();
    body.push(b'\n');
    let mut w = stream;
    if http::write_response(&mut w, status, &all, &body, true, false).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = io::copy(&mut reader.by_ref().take(LINGER_DRAIN), &mut io::sink());
    }
    false
}
