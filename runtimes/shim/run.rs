//! Answering a request by running the command once, in one of two modes:
//!
//! - **buffered** (the default): stdout is collected (up to `--max-output`) and sent once
//!   the command has exited, so the status tells the truth: 200 for exit code 0, 500 with
//!   the end of stderr for any other, 504 past `--timeout`.
//! - **streamed** (`--stream`): the head is sent when the first bytes of output appear and
//!   each read of stdout goes out as a chunk at once, for long renders and progress
//!   output. A command that fails before printing anything still gets its 500 or 504; one
//!   that fails after has its response cut (no final chunk, connection closed), so the
//!   client sees an incomplete body rather than a short one that looks whole.
//!
//! Every request ends with a line in the container log: id, method, path, status, exit,
//! time and bytes.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{ChildStdout, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::http::{self, Head, Streaming};
use crate::process::{self, Ended, Process};
use crate::slots::Slot;

const TEXT: &str = "text/plain; charset=utf-8";
/// The largest single read of stdout, and so the largest chunk sent.
const READ_SIZE: usize = 64 * 1024;

/// What one request is: its id (for the log), head, body and connection.
pub struct Call<'a> {
    pub id: u64,
    pub head: &'a Head,
    pub body: Vec<u8>,
    pub conn: &'a TcpStream,
    /// Whether the connection closes after this answer.
    pub close: bool,
}

/// What stdout gave in buffered mode.
enum Output {
    Whole(Vec<u8>),
    /// More than `--max-output`: the command was killed.
    TooLarge,
}

/// How an answer went, for the log line.
struct Report {
    /// Whether the connection may carry another request.
    keep: bool,
    /// The status sent (`-` for none, `200 cut` for a stream cut short).
    status: String,
    ended: Ended,
    bytes: usize,
}

/// Runs the command for `call` in the slot it holds and answers; whether the connection
/// may carry another request.
pub fn answer(config: &Config, mut call: Call<'_>, slot: &mut Slot<'_>) -> bool {
    let started = Instant::now();
    let body = std::mem::take(&mut call.body);
    let label = format!("[#{}]", call.id);
    let (process, stdout) = match process::spawn(&config.command, call.head, body, label) {
        Ok(p) => p,
        Err(e) => {
            let why = format!("cannot start `{}`: {e}\n", config.command.join(" "));
            eprint!("ember-shim: #{} {why}", call.id);
            return reply(&call, 500, &[("content-type", TEXT)], why.as_bytes());
        }
    };
    slot.track(process.pgid);
    let deadline = started + config.timeout;
    let report = if config.stream && call.head.method != "HEAD" {
        stream(config, &call, process, stdout, deadline)
    } else {
        buffered(config, &call, process, stdout, deadline)
    };
    eprintln!(
        "ember-shim: #{} {} {} -> {} ({}) in {} ms, {} bytes",
        call.id,
        call.head.method,
        call.head.path,
        report.status,
        describe(&report.ended),
        started.elapsed().as_millis(),
        report.bytes,
    );
    report.keep
}

/// Buffered mode: collect stdout, then answer by how the command ended.
fn buffered(
    config: &Config,
    call: &Call<'_>,
    process: Process,
    stdout: ChildStdout,
    deadline: Instant,
) -> Report {
    let pgid = process.pgid;
    let (ended, output) = thread::scope(|s| {
        let reader = s.spawn(|| read_capped(stdout, config.max_output, pgid));
        let ended = process.supervise(deadline, call.conn);
        (ended, reader.join().unwrap_or(Output::Whole(Vec::new())))
    });
    let stderr = process.stderr_tail();
    settle(config, call, ended, output, &stderr)
}

/// Sends the answer for a command that has ended and whose output is all there.
fn settle(config: &Config, call: &Call<'_>, ended: Ended, output: Output, stderr: &[u8]) -> Report {
    let (status, headers, body) = match (ended, output) {
        (Ended::ClientGone, _) => {
            return Report {
                keep: false,
                status: "-".into(),
                ended,
                bytes: 0,
            };
        }
        (_, Output::TooLarge) => failure(
            500,
            format!(
                "the command's output passed --max-output ({} bytes) and it was killed; \
                 raise --max-output, or use --stream to send output as it is made",
                config.max_output
            ),
            stderr,
        ),
        (Ended::Exited(status), Output::Whole(out)) if status.success() => (
            200,
            vec![
                ("content-type", config.content_type.clone()),
                exit_header(status),
            ],
            out,
        ),
        (Ended::Exited(status), _) => {
            let (s, mut headers, body) = failure(500, describe(&ended), stderr);
            headers.push(exit_header(status));
            (s, headers, body)
        }
        (Ended::TimedOut, _) => failure(
            504,
            format!(
                "the command ran past --timeout ({}) and was killed",
                show(config.timeout)
            ),
            stderr,
        ),
    };
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let keep = reply(call, status, &headers, &body);
    Report {
        keep,
        status: status.to_string(),
        ended,
        bytes: body.len(),
    }
}

/// Streamed mode: the head goes out with the first bytes of output, each read as a chunk.
fn stream(
    config: &Config,
    call: &Call<'_>,
    process: Process,
    mut stdout: ChildStdout,
    deadline: Instant,
) -> Report {
    let mut buf = vec![0u8; READ_SIZE];
    let streamed = thread::scope(|s| {
        let supervisor = s.spawn(|| process.supervise(deadline, call.conn));
        let first = read_some(&mut stdout, &mut buf);
        if first == 0 {
            // Nothing printed: the exit decides the status, as in buffered mode.
            return Err(supervisor.join().expect("the supervisor does not panic"));
        }
        let headers = [("content-type", config.content_type.as_str())];
        let mut bytes = 0;
        let delivered = Streaming::start(call.conn, &headers, call.close, call.head.http10)
            .and_then(|mut out| {
                let mut n = first;
                while n > 0 {
                    out.send(&buf[..n])?;
                    bytes += n;
                    n = read_some(&mut stdout, &mut buf);
                }
                Ok(out)
            });
        if delivered.is_err() {
            process.kill();
        }
        let ended = supervisor.join().expect("the supervisor does not panic");
        // A stream dropped without its final chunk is cut: the client sees it incomplete.
        let finished = match delivered {
            Ok(out) if matches!(ended, Ended::Exited(s) if s.success()) => out.finish().is_ok(),
            _ => false,
        };
        let status = if finished { "200" } else { "200 cut" };
        Ok(Report {
            // An HTTP/1.0 body ends with the connection, so it cannot carry another request.
            keep: finished && !call.close && !call.head.http10,
            status: status.into(),
            ended,
            bytes,
        })
    });
    let stderr = process.stderr_tail();
    match streamed {
        Ok(report) => report,
        Err(ended) => settle(config, call, ended, Output::Whole(Vec::new()), &stderr),
    }
}

/// An error answer: the reason on the first line, then the end of the command's stderr.
fn failure(status: u16, why: String, stderr: &[u8]) -> (u16, Vec<(&'static str, String)>, Vec<u8>) {
    let mut body = why.into_bytes();
    body.push(b'\n');
    if !stderr.is_empty() {
        body.extend_from_slice(b"stderr:\n");
        body.extend_from_slice(stderr);
    }
    (status, vec![("content-type", TEXT.to_string())], body)
}

fn exit_header(status: ExitStatus) -> (&'static str, String) {
    ("x-ember-exit-code", exit_code(status).to_string())
}

/// The shell's number for an exit: the code, or 128 + the signal.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn describe(ended: &Ended) -> String {
    match ended {
        Ended::Exited(s) if s.code().is_some() => {
            format!("the command exited with code {}", exit_code(*s))
        }
        Ended::Exited(s) => format!(
            "the command was killed by signal {}",
            s.signal().unwrap_or(0)
        ),
        Ended::TimedOut => "timed out".into(),
        Ended::ClientGone => "the client went away; the command was killed".into(),
    }
}

fn show(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Sends a whole answer; whether the connection may carry another request.
fn reply(call: &Call<'_>, status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
    let head_only = call.head.method == "HEAD";
    let mut conn = call.conn;
    http::write_response(&mut conn, status, headers, body, call.close, head_only).is_ok()
        && !call.close
}

/// Reads stdout to its end, or kills the group once it passes `max` bytes.
fn read_capped(mut stdout: ChildStdout, max: u64, pgid: u32) -> Output {
    let mut out = Vec::new();
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        let n = read_some(&mut stdout, &mut buf);
        if n == 0 {
            return Output::Whole(out);
        }
        if (out.len() + n) as u64 > max {
            let _ = crate::sys::kill_group(pgid);
            return Output::TooLarge;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// One read; 0 at the end of the stream or on an error.
fn read_some(r: &mut impl Read, buf: &mut [u8]) -> usize {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result.unwrap_or(0),
        }
    }
}
