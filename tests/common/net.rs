//! Network helpers of the tunnel tests: a TCP relay whose connections a test can cut (as a
//! broken network would, without killing either end), and the listening sockets of a
//! process, read from /proc.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A relay on 127.0.0.1 to `target`.
pub struct CutRelay {
    pub addr: SocketAddr,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    freeze: Arc<Mutex<CancellationToken>>,
    frozen: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    refusing: Arc<AtomicBool>,
}

impl CutRelay {
    /// Starts relaying to `target`.
    pub async fn start(target: SocketAddr) -> CutRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let freeze: Arc<Mutex<CancellationToken>> = Arc::default();
        let frozen: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let refusing: Arc<AtomicBool> = Arc::default();
        let (held, freezing, graveyard) = (links.clone(), freeze.clone(), frozen.clone());
        let refuse = refusing.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    continue; // dropped: the caller sees its connection closed
                }
                let stop = freezing.lock().unwrap().clone();
                let graveyard = graveyard.clone();
                let link = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Frozen: both ends stay open, and nothing flows any more.
                        _ = stop.cancelled() => graveyard.lock().unwrap().push((client, server)),
                    }
                });
                held.lock().unwrap().push(link);
            }
        });
        CutRelay {
            addr,
            links,
            accept,
            freeze,
            frozen,
            refusing,
        }
    }

    /// Closes new connections at once (`false` relays them again).
    pub fn refuse_new(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
    }

    /// Stops every connection open now from carrying anything, without closing it (a
    /// silent network); new connections are relayed again.
    pub fn freeze(&self) {
        let mut token = self.freeze.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Drops every connection open now (new ones are relayed again).
    pub fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Connections relayed now.
    pub fn open(&self) -> usize {
        self.links
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.is_finished())
            .count()
    }
}

impl Drop for CutRelay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
        self.frozen.lock().unwrap().clear();
    }
}

/// The TCP ports process `pid` listens on (IPv4 and IPv6), from /proc.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let sockets: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    l.strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Columns: sl, local, remote, st (0A is LISTEN), …, inode is the tenth.
            if cols.len() > 9 && cols[3] == "0A" && sockets.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap_or("0");
                ports.push(u16::from_str_radix(port, 16).unwrap_or(0));
            }
        }
    }
    ports
}
