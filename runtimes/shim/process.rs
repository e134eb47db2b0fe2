//! One run of the command: started in a process group of its own with the request in its
//! environment and the body on its stdin, its stderr relayed to the container log (and the
//! tail kept for an error answer), and watched until it exits, runs past its deadline, or
//! its client goes away. Whatever ends it, the whole group is killed afterwards, so nothing
//! it started outlives the request.
//!
//! What to answer is `run.rs`'s business; this file only runs and watches.
//!
//! Each run takes three threads here (stdin, stderr, the wait) and one or two in
//! `run.rs`; with the commands' own processes they count against the container's pids
//! limit (512 under Ember), which bounds a sensible `--concurrency` well above what a
//! GPU-heavy command can use anyway.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http::Head;
use crate::sys;

/// How much of a command's stderr an error answer carries (its end: where errors are).
pub const STDERR_TAIL: usize = 16 * 1024;
/// How often a running command's client is checked for having gone away.
const PEER_CHECK: Duration = Duration::from_millis(200);
/// Variables the shim sets per request; inherited ones are removed first.
const METHOD: &str = "EMBER_METHOD";
const PATH: &str = "EMBER_PATH";
const QUERY: &str = "EMBER_QUERY";
const HEADER_PREFIX: &str = "EMBER_HEADER_";

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ended {
    /// The command exited (or was killed by a signal it did not get from the shim).
    Exited(ExitStatus),
    /// The deadline passed; the group was killed.
    TimedOut,
    /// The client closed its connection; the group was killed.
    ClientGone,
}

/// A started command, without its stdout (the caller reads that).
pub struct Process {
    pub pgid: u32,
    /// Mutex: the supervisor may watch from another thread than the one that started it.
    exit: Mutex<Receiver<ExitStatus>>,
    stderr: JoinHandle<Vec<u8>>,
}

/// The environment variable that carries header `name`: `X-Scene-Id` → `EMBER_HEADER_X_SCENE_ID`.
pub fn header_var(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{HEADER_PREFIX}{name}")
}

/// The request as environment variables; a header sent more than once is joined with `, `.
pub fn request_env(head: &Head) -> Vec<(String, String)> {
    let mut env = vec![
        (METHOD.to_string(), head.method.clone()),
        (PATH.to_string(), head.path.clone()),
        (QUERY.to_string(), head.query.clone()),
    ];
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in &head.headers {
        let var = header_var(name);
        match headers.iter_mut().find(|(v, _)| *v == var) {
            Some((_, joined)) => {
                joined.push_str(", ");
                joined.push_str(value);
            }
            None => headers.push((var, value.clone())),
        }
    }
    env.extend(headers);
    env
}

/// Starts `command` for the request `head` with `body` on its stdin. `label` prefixes its
/// stderr lines in the container log.
pub fn spawn(
    command: &[String],
    head: &Head,
    body: Vec<u8>,
    label: String,
) -> io::Result<(Process, ChildStdout)> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with(HEADER_PREFIX) || [METHOD, PATH, QUERY].contains(&key.as_ref()) {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.envs(request_env(head))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pgid = child.id();
    let (stdin, stdout, stderr) = (
        child.stdin.take().expect("piped"),
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    // A command that never reads its stdin just leaves this thread to end on EPIPE.
    thread::spawn(move || {
        let mut stdin = stdin;
        let _ = stdin.write_all(&body);
    });
    let stderr = thread::spawn(move || relay_stderr(stderr, &label, &mut io::stderr()));
    let (tx, exit) = mpsc::channel();
    thread::spawn(move || wait(child, tx));
    Ok((
        Process {
            pgid,
            exit: Mutex::new(exit),
            stderr,
        },
        stdout,
    ))
}

fn wait(mut child: Child, tx: mpsc::Sender<ExitStatus>) {
    match child.wait() {
        Ok(status) => {
            let _ = tx.send(status);
        }
        Err(e) => eprintln!("ember-shim: cannot wait for process {}: {e}", child.id()),
    }
}

/// Copies `stderr` to `log` (the shim's own stderr) line by line, each line prefixed with
/// `label`, and returns its last [`STDERR_TAIL`] bytes.
fn relay_stderr(mut stderr: impl Read, label: &str, log: &mut impl Write) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    let mut emit = |line: &[u8]| {
        let mut out = format!("{label} ").into_bytes();
        out.extend_from_slice(line);
        if line.last() != Some(&b'\n') {
            out.push(b'\n');
        }
        let _ = log.write_all(&out);
    };
    loop {
        let n = match stderr.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            emit(&line);
        }
        // A line that never ends is still logged, in pieces.
        if pending.len() >= buf.len() {
            emit(&pending);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        emit(&pending);
    }
    if tail.len() > STDERR_TAIL {
        tail.drain(..tail.len() - STDERR_TAIL);
    }
    tail
}

impl Process {
    /// Kills the command's whole process group.
    pub fn kill(&self) {
        if let Err(e) = sys::kill_group(self.pgid) {
            eprintln!("ember-shim: cannot kill process group {}: {e}", self.pgid);
        }
    }

    /// Waits until the command exits, `deadline` passes or `peer` closes its connection,
    /// then kills the group (after an exit: whatever the command left running).
    pub fn supervise(&self, deadline: Instant, peer: &TcpStream) -> Ended {
        let exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        let ended = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Ended::TimedOut;
            }
            match exit.recv_timeout(left.min(PEER_CHECK)) {
                Ok(status) => break Ended::Exited(status),
                // The waiter could not wait (it logged why): count it as a failure.
                Err(RecvTimeoutError::Disconnected) => {
                    break Ended::Exited(ExitStatus::from_raw(255 << 8))
                }
                Err(RecvTimeoutError::Timeout) if client_left(peer) => break Ended::ClientGone,
                Err(RecvTimeoutError::Timeout) => {}
            }
        };
        self.kill();
        if !matches!(ended, Ended::Exited(_)) {
            // Answer only once it is gone, so a caller that retries finds the slot free.
            let _ = exit.recv_timeout(Duration::from_secs(5));
        }
        ended
    }

    /// The end of the command's stderr, once it has closed it.
    pub fn stderr_tail(self) -> Vec<u8> {
        self.stderr.join().unwrap_or_default()
    }
}

/// Whether the client closed its side: a read of zero bytes at the end of the stream.
/// Bytes waiting (a pipelined request) or none yet both mean it is still there.
fn client_left(peer: &TcpStream) -> bool {
    let _ = peer.set_read_timeout(Some(Duration::from_millis(1)));
    let left = match peer.peek(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    };
    let _ = peer.set_read_timeout(None);
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> Head {
        Head {
            method: "POST".into(),
            path: "/render".into(),
            query: "frame=3".into(),
            http10: false,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn headers_become_upper_case_variables_and_repeats_are_joined() {
        assert_eq!(header_var("X-Scene.Id"), "EMBER_HEADER_X_SCENE_ID");
        let env = request_env(&head(&[("Accept", "a"), ("accept", "b"), ("X-Frame", "3")]));
        assert_eq!(env[0], ("EMBER_METHOD".into(), "POST".into()));
        assert_eq!(env[1], ("EMBER_PATH".into(), "/render".into()));
        assert_eq!(env[2], ("EMBER_QUERY".into(), "frame=3".into()));
        assert!(env.contains(&("EMBER_HEADER_ACCEPT".into(), "a, b".into())));
        assert!(env.contains(&("EMBER_HEADER_X_FRAME".into(), "3".into())));
    }

    #[test]
    fn the_stderr_tail_keeps_the_end() {
        let long: Vec<u8> = (0..3 * STDERR_TAIL)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let mut text = long.clone();
        text.extend_from_slice(b"\nthe real error\n");
        let mut log = Vec::new();
        let tail = relay_stderr(&text[..], "[#7]", &mut log);
        assert_eq!(tail.len(), STDERR_TAIL);
        assert!(tail.ends_with(b"the real error\n"));
        assert!(log.starts_with(b"[#7] abc"));
        assert!(
            log.ends_with(b"[#7] the real error\n"),
            "every line is labelled in the log"
        );
    }
}
