//! gpu-info: an Ember function that reports which GPUs it was given.
//!
//! Answers every request (`GET /healthz` with `ok`) with JSON: the container's hostname,
//! `NVIDIA_VISIBLE_DEVICES`, `EMBER_GPU_UUIDS`, and the output of `nvidia-smi -L` when the
//! NVIDIA runtime mounted it (null otherwise, as in simulation mode). Plain std, one
//! request per connection, built statically for a FROM scratch image.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn optional(value: Option<String>) -> String {
    value.map_or("null".to_string(), |v| json_string(&v))
}

fn report() -> String {
    let hostname = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok());
    let smi = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    format!(
        "{{\"hostname\":{},\"nvidia_visible_devices\":{},\"ember_gpu_uuids\":{},\"nvidia_smi\":{}}}\n",
        optional(hostname),
        optional(std::env::var("NVIDIA_VISIBLE_DEVICES").ok()),
        optional(std::env::var("EMBER_GPU_UUIDS").ok()),
        optional(smi),
    )
}

fn handle(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    // Read and drop a body so the client sees a clean close.
    std::io::copy(&mut reader.take(content_length as u64), &mut std::io::sink())?;
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (content_type, body) = if path == "/healthz" {
        ("text/plain", "ok".to_string())
    } else {
        ("application/json", report())
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn main() {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gpu-info: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("gpu-info listening on 0.0.0.0:{port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = handle(stream);
        });
    }
}
