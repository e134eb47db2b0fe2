//! The few POSIX calls the standard library does not offer: signalling a whole process
//! group, catching SIGTERM, waking a blocked `accept`, and the fork and reaping loop of an
//! init process. Every `unsafe` of the shim is here; the rest of it is safe Rust.
//!
//! The constants are Linux's (the same on x86_64 and aarch64): the shim runs in Linux
//! containers only.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

pub const SIGINT: i32 = 2;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
const SHUT_RDWR: i32 = 2;
const ECHILD: i32 = 10;
const ESRCH: i32 = 3;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn shutdown(fd: i32, how: i32) -> i32;
    fn fork() -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
}

/// Set by SIGTERM or SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);
/// The listening socket the signal handler shuts down, so that `accept` returns at once.
static LISTENER: AtomicI32 = AtomicI32::new(-1);
/// In the init process: the server it forwards signals to.
static SERVER: AtomicI32 = AtomicI32::new(0);

/// Sends SIGKILL to every process of group `pgid`; a group already gone is not an error.
pub fn kill_group(pgid: u32) -> io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill has no memory effects; a negative pid names a process group.
    if unsafe { kill(-pgid, SIGKILL) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(ESRCH) {
        Ok(())
    } else {
        Err(e)
    }
}

/// Whether SIGTERM or SIGINT has arrived.
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

extern "C" fn on_stop(_sig: i32) {
    // Only async-signal-safe work here: an atomic store and shutdown(2).
    STOP.store(true, Ordering::SeqCst);
    let fd = LISTENER.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutdown on a descriptor the server keeps open for its whole life.
        unsafe { shutdown(fd, SHUT_RDWR) };
    }
}

/// Catches SIGTERM and SIGINT: they set [`stopping`] and shut `listener` down, which
/// makes a blocked `accept` on it fail at once.
pub fn stop_on_signal(listener: &impl AsRawFd) {
    LISTENER.store(listener.as_raw_fd(), Ordering::SeqCst);
    for sig in [SIGTERM, SIGINT] {
        // SAFETY: on_stop is an extern "C" fn(i32) that only touches atomics and calls
        // an async-signal-safe function.
        unsafe { signal(sig, on_stop) };
    }
}

extern "C" fn forward(sig: i32) {
    let pid = SERVER.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { kill(pid, sig) };
    }
}

/// Makes this process, when it is PID 1 of a container, an init: it forks, the child
/// returns from here to be the server, and the parent forwards SIGTERM and SIGINT to it,
/// reaps every process the container orphans (a killed command's children end up here),
/// and exits with the server's status. Must be called before any thread is started.
pub fn become_init() {
    // SAFETY: the process has one thread, so the child is a consistent copy.
    let child = unsafe { fork() };
    if child < 0 {
        eprintln!(
            "ember-shim: cannot fork the server ({}); running without an init",
            io::Error::last_os_error()
        );
        return;
    }
    if child == 0 {
        return;
    }
    SERVER.store(child, Ordering::SeqCst);
    for sig in [SIGTERM, SIGINT] {
        // SAFETY: forward is an extern "C" fn(i32) that only calls kill.
        unsafe { signal(sig, forward) };
    }
    loop {
        let mut status = 0;
        // SAFETY: status is a valid i32 to write to.
        let pid = unsafe { waitpid(-1, &mut status, 0) };
        if pid == child {
            std::process::exit(exit_code(status));
        }
        if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(ECHILD) {
            std::process::exit(1);
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal that ended the process.
fn exit_code(status: i32) -> i32 {
    let signal = status & 0x7f;
    if signal == 0 {
        (status >> 8) & 0xff
    } else {
        128 + signal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_become_shell_exit_codes() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(SIGKILL), 137);
    }
}
