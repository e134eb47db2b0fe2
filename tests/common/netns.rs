//! Test hosts in network namespaces: each gets a veth pair to the host, an address of its
//! own, and a default route through the host, so it reaches the host's Docker bridge and
//! the other namespaces, and nothing else sees it unless it allows it. Made by the test,
//! removed by `Drop` (the namespace, its veth, and the `DOCKER-USER` rules that let its
//! traffic through Docker's FORWARD chain). Needs root, `ip` and `iptables`.

use std::process::{Command, Stdio};

/// Whether network namespaces can be made here. Under CI they must be; elsewhere a test
/// that needs them skips, saying so.
pub fn available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["ip", "iptables"].iter().all(|t| {
        Command::new(t)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    let ok = root && tools;
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI=true: network namespace tests need root, `ip` and `iptables`");
        }
        eprintln!("SKIPPED: network namespace tests need root, `ip` and `iptables`");
    }
    ok
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One namespace with its veth to the host.
pub struct Netns {
    pub name: String,
    /// Its own address.
    pub ip: String,
    host_if: String,
}

impl Netns {
    /// Makes namespace `tag` (a few letters) as host number `index` (0..=3) of this test
    /// process: address 10.(200+index).(pid % 250).2, the host's side .1.
    pub fn new(tag: &str, index: u8) -> Netns {
        let pid = std::process::id();
        let name = format!("ember-{tag}-{pid}");
        let host_if = format!("e{tag}{}h", pid % 100_000);
        let ns_if = format!("e{tag}{}n", pid % 100_000);
        let net = format!("10.{}.{}", 200 + u32::from(index), pid % 250);
        let (host_ip, ip) = (format!("{net}.1"), format!("{net}.2"));
        run(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            ip: ip.clone(),
            host_if: host_if.clone(),
        };
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        run(&["ip", "link", "set", &ns_if, "netns", &name]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ]);
        run(&["ip", "link", "set", &host_if, "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{ip}/30"), "dev", &ns_if]);
        ns.exec(&["ip", "link", "set", &ns_if, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", &host_ip]);
        for dir in ["-i", "-o"] {
            run(&[
                "iptables",
                "-I",
                "DOCKER-USER",
                dir,
                &host_if,
                "-j",
                "ACCEPT",
            ]);
        }
        ns
    }

    /// Runs a command inside the namespace; it must succeed.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all);
    }

    /// A command's output, run inside the namespace.
    pub fn output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Drops every new inbound TCP connection: the namespace can only dial out.
    pub fn drop_inbound_tcp(&self) {
        self.exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for dir in ["-i", "-o"] {
            let _ = Command::new("iptables")
                .args(["-D", "DOCKER-USER", dir, &self.host_if, "-j", "ACCEPT"])
                .output();
        }
        // Deleting the namespace deletes its end of the veth, and with it the host's.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_if])
            .output();
    }
}
