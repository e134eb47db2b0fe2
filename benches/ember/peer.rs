//! Peer: Ember's gateway against nginx in front of the same container, in one run. nginx
//! (when installed) gets one worker, a `keepalive` upstream to the container's bridge
//! address (where Ember reaches it too) and `proxy_buffering off`; both take the same
//! load, POSTs of 5 bytes from `wrk` (when installed; the harness's own client otherwise)
//! at concurrency 16 and 64, in alternating runs. Each server's CPU time (user + system,
//! all its processes) is read from `/proc/PID/stat` before and after: CPU µs per
//! request, throughput and latency p50/p99 for both, and the ratios (Ember / nginx).
//! Without nginx it says so and skips.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::common::{self, Gateway};
use crate::probe::{http_client, send};
use crate::report::{row, Row};
use crate::Size;

/// One measured run of one server.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    requests: f64,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    if !installed("nginx") {
        eprintln!("  peer: nginx is not installed (apt install nginx wrk); skipped");
        return;
    }
    let gw = Gateway::start().await;
    let manifest = common::echo_manifest(
        "peer",
        "",
        "[scale]\nmin = 1\nmax = 1\nconcurrency = 1000\nidle_timeout = \"1h\"",
    );
    assert!(gw.deploy("peer", &manifest).await.status.is_success());
    let via = format!("{}/fn/peer/", gw.url);
    common::eventually(Duration::from_secs(60), "the instance answers", || async {
        send(&http_client(), &via, Bytes::from_static(b"hello"))
            .await
            .0
            == 200
    })
    .await;
    let endpoint = gw.function("peer").await["instances"][0]["endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let (mut nginx, port) = start_nginx(dir.path(), &endpoint);
    let direct = format!("http://127.0.0.1:{port}/");
    common::eventually(Duration::from_secs(10), "nginx answers", || async {
        send(&http_client(), &direct, Bytes::from_static(b"hello"))
            .await
            .0
            == 200
    })
    .await;
    let wrk = installed("wrk");
    let tool = if wrk { "wrk" } else { "the harness's client" };
    let gateway_pid = gw.pid().expect("the gateway runs");
    let nginx_pid = nginx.id();
    let seconds = size.throughput_for.as_secs().max(1);
    for connections in [16, 64] {
        // Warm both, then two rounds each, alternating; the better round of each counts
        // (the machine's other work only ever slows one down).
        load(wrk, &via, connections, 1, dir.path()).await;
        load(wrk, &direct, connections, 1, dir.path()).await;
        let mut ember = Run::default();
        let mut peer = Run::default();
        for round in 0..2 {
            let order = if round == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_ember in order {
                let (url, pid) = if is_ember {
                    (&via, gateway_pid)
                } else {
                    (&direct, nginx_pid)
                };
                let before = cpu_ticks(pid);
                let mut r = load(wrk, url, connections, seconds, dir.path()).await;
                let used = cpu_ticks(pid) - before;
                r.cpu_us_per_request = used as f64 * 1e6 / ticks_per_second() / r.requests;
                let best = if is_ember { &mut ember } else { &mut peer };
                if r.per_s > best.per_s {
                    *best = r;
                }
            }
        }
        eprintln!(
            "  peer c={connections} ({tool}): ember {ember:?}\n                 nginx {peer:?}"
        );
        let name = |what: &str| format!("{what}, c={connections} (vs nginx)");
        rows.push(row(
            "peer",
            &name("CPU per request"),
            ember.cpu_us_per_request,
            Some(peer.cpu_us_per_request),
            "µs",
        ));
        rows.push(row(
            "peer",
            &name("throughput"),
            ember.per_s,
            Some(peer.per_s),
            "req/s",
        ));
        rows.push(row(
            "peer",
            &name("latency p50"),
            ember.p50_ms,
            Some(peer.p50_ms),
            "ms",
        ));
        rows.push(row(
            "peer",
            &name("latency p99"),
            ember.p99_ms,
            Some(peer.p99_ms),
            "ms",
        ));
    }
    let _ = nginx.kill();
    let _ = nginx.wait();
}

/// nginx with one worker in `dir`, proxying to `endpoint`; the process and its port.
fn start_nginx(dir: &Path, endpoint: &str) -> (Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream container {{ server {endpoint}; keepalive 128; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
               proxy_pass http://container;\n      proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
               proxy_request_buffering off;\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx starts");
    (child, port)
}

/// Clock ticks per second of `/proc/PID/stat`'s times.
fn ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU ticks of `pid` and its children (nginx's worker).
fn cpu_ticks(pid: u32) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's `)`: state, ppid, …; utime and stime are fields 14 and 15.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let own: u32 = head
            .split('(')
            .next()
            .unwrap_or("")
            .trim()
            .parse()
            .unwrap_or(0);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let parent: u32 = f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if own == pid || parent == pid {
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            total += t(11) + t(12);
        }
    }
    total
}

/// `seconds` of POSTs of 5 bytes to `url` over `connections` connections.
async fn load(wrk: bool, url: &str, connections: usize, seconds: u64, dir: &Path) -> Run {
    if wrk {
        let script = dir.join("post.lua");
        std::fs::write(
            &script,
            "wrk.method = \"POST\"\nwrk.body = \"hello\"\nwrk.headers[\"Content-Type\"] = \"text/plain\"\n",
        )
        .unwrap();
        let out = Command::new("wrk")
            .args(["-t", "1", "-c", &connections.to_string()])
            .args(["-d", &format!("{seconds}s"), "--latency", "-s"])
            .arg(&script)
            .arg(url)
            .output()
            .expect("wrk runs");
        return parse_wrk(&String::from_utf8_lossy(&out.stdout));
    }
    harness_load(url, connections, seconds).await
}

/// wrk's `Requests/sec`, request count and latency distribution.
fn parse_wrk(text: &str) -> Run {
    let ms = |v: &str| {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = n.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1000.0,
            "s" => n * 1000.0,
            _ => n,
        }
    };
    let mut r = Run::default();
    for line in text.lines().map(str::trim) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => r.per_s = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50_ms = ms(v),
            ["99%", v] => r.p99_ms = ms(v),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    assert!(r.requests > 0.0, "wrk ran: {text}");
    r
}

/// The harness's own load when wrk is absent: `connections` tasks sending in a loop.
async fn harness_load(url: &str, connections: usize, seconds: u64) -> Run {
    let client = http_client();
    let until = Instant::now() + Duration::from_secs(seconds);
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, url) = (client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                assert_eq!(
                    send(&client, &url, Bytes::from_static(b"hello")).await.0,
                    200
                );
                took.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            took
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = began.elapsed().as_secs_f64();
    let sorted = crate::report::sorted(all);
    Run {
        requests: sorted.len() as f64,
        per_s: sorted.len() as f64 / elapsed,
        p50_ms: crate::report::percentile(&sorted, 0.5),
        p99_ms: crate::report::percentile(&sorted, 0.99),
        cpu_us_per_request: 0.0,
    }
}
