//! `/ws?clientId=ID`: ComfyUI's WebSocket. Each connected client is registered under its
//! client id (one made up when it gives none); a client reconnecting with the same id
//! replaces, and closes, its old socket. Messages are text frames `{"type", "data"}`, and
//! previews binary frames; they go to one client id or to all. Writes to a socket are
//! serialized by a lock around its stream, with a timeout, and a socket whose write fails
//! leaves the registry, so one stuck client cannot hold the worker up for long.
//!
//! On connect the client gets `status` with its `sid`, and, if it owns the running prompt,
//! `executing` with the current node. A first message `feature_flags` is answered with
//! the server's flags; other messages are ignored; ping gets pong, close gets close.

use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::json::{self, quote, Json};
use crate::ws::{self, Frame};
use crate::{api, files, instance, uuid4_hex, Request, Server};

/// How long a write to a client may block before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message taken from a client (aiohttp's default); beyond it, close 1009.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Where a message goes.
#[derive(Clone, Copy)]
pub enum To<'a> {
    All,
    Client(&'a str),
}

impl<'a> To<'a> {
    /// ComfyUI's `send_sync(event, data, sid)`: to `sid`, or to everyone without one.
    pub fn client_or_all(client: Option<&'a str>) -> To<'a> {
        client.map_or(To::All, To::Client)
    }
}

/// A connected socket.
struct Client {
    sid: String,
    /// Tells this connection from a later one with the same client id.
    conn: u64,
    stream: Mutex<TcpStream>,
}

impl Client {
    fn stream(&self) -> MutexGuard<'_, TcpStream> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one frame in one piece.
    fn write(&self, fin_opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut stream = self.stream();
        let mut w = BufWriter::with_capacity(payload.len() + 16, &mut *stream);
        ws::write_frame(&mut w, fin_opcode, payload)
    }

    /// Sends a close frame (best effort) and shuts the connection, which ends its reader.
    fn close(&self, status: u16) {
        let _ = self.write(0x88, &status.to_be_bytes());
        let _ = self.stream().shutdown(Shutdown::Both);
    }
}

/// The connected clients.
pub struct Registry {
    clients: Mutex<Vec<Arc<Client>>>,
    next_conn: AtomicU64,
}

impl Registry {
    pub fn new() -> Registry {
        Registry { clients: Mutex::new(Vec::new()), next_conn: AtomicU64::new(1) }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Client>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `{"type": event, "data": data}` (`data` is JSON).
    pub fn send(&self, event: &str, data: &str, to: To) {
        let text = format!(r#"{{"type":{},"data":{data}}}"#, quote(event));
        self.deliver(0x81, text.as_bytes(), to);
    }

    /// Sends a binary message.
    pub fn send_binary(&self, payload: &[u8], to: To) {
        self.deliver(0x82, payload, to);
    }

    /// Tells everyone how many prompts remain (ComfyUI's `queue_updated`).
    pub fn status(&self, remaining: usize) {
        self.send("status", &status_data(remaining, None), To::All);
    }

    fn deliver(&self, fin_opcode: u8, payload: &[u8], to: To) {
        // Written outside the registry's lock: a slow client must not block the others'
        // registration, only its own writes.
        let targets: Vec<Arc<Client>> = self
            .lock()
            .iter()
            .filter(|c| match to {
                To::All => true,
                To::Client(sid) => c.sid == sid,
            })
            .cloned()
            .collect();
        for client in targets {
            if client.write(fin_opcode, payload).is_err() {
                self.remove(&client);
                let _ = client.stream().shutdown(Shutdown::Both);
            }
        }
    }

    /// Registers `client`; the socket it replaces, if its id was taken.
    fn insert(&self, client: Arc<Client>) -> Option<Arc<Client>> {
        let mut clients = self.lock();
        let old = clients.iter().position(|c| c.sid == client.sid).map(|at| clients.remove(at));
        clients.push(client);
        old
    }

    /// Unregisters `client`, unless a reconnection already replaced it.
    fn remove(&self, client: &Client) {
        self.lock().retain(|c| c.conn != client.conn);
    }
}

/// The data of a `status` message: the queue, and the client's id when it connects.
fn status_data(remaining: usize, sid: Option<&str>) -> String {
    let sid = sid.map(|s| format!(",\"sid\":{}", quote(s))).unwrap_or_default();
    format!(r#"{{"status":{{"exec_info":{{"queue_remaining":{remaining}}}}}{sid}}}"#)
}

/// Whether a request opens the socket: `GET /ws` (or `/api/ws`) asking to upgrade.
pub fn is_upgrade(req: &Request) -> bool {
    let path = api::route_path(req.target.split('?').next().unwrap_or_default());
    req.method == "GET" && path == "/ws" && ws::wants_upgrade(req.header("upgrade"), req.header("sec-websocket-key"))
}

/// Answers the handshake, registers the client, then reads its messages until it closes.
pub fn session(server: &Arc<Server>, req: &Request, mut reader: BufReader<TcpStream>, mut stream: TcpStream) {
    let key = req.header("sec-websocket-key").unwrap_or_default();
    let accept = ws::base64(&ws::sha1(format!("{}{}", key.trim(), ws::GUID).as_bytes()));
    let handshake = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\nx-stub-instance: {}\r\n\r\n",
        instance()
    );
    if stream.write_all(handshake.as_bytes()).is_err() || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let sid = files::query(&req.target)
        .into_iter()
        .find(|(k, v)| k == "clientId" && !v.is_empty())
        .map_or_else(uuid4_hex, |(_, v)| v);
    let registry = &server.sockets;
    let conn = registry.next_conn.fetch_add(1, Ordering::Relaxed);
    let client = Arc::new(Client { sid: sid.clone(), conn, stream: Mutex::new(stream) });
    if let Some(old) = registry.insert(Arc::clone(&client)) {
        old.close(1000);
    }
    registry.send("status", &status_data(server.queue.remaining(), Some(&sid)), To::Client(&sid));
    if let Some(node) = server.queue.node_for(&sid) {
        registry.send("executing", &format!(r#"{{"node":{}}}"#, quote(&node)), To::Client(&sid));
    }
    read_messages(&client, &mut reader);
    registry.remove(&client);
    let _ = client.stream().shutdown(Shutdown::Both);
}

/// Reads frames until the client closes or breaks the protocol.
fn read_messages(client: &Client, reader: &mut BufReader<TcpStream>) {
    let mut first = true;
    let mut message = Vec::new();
    let mut is_text = false;
    loop {
        let (fin_opcode, payload) = match ws::read_frame(reader) {
            Ok(Some(Frame::Data { fin_opcode, payload })) => (fin_opcode, payload),
            Ok(Some(Frame::Refused(status))) => return client.close(status),
            Ok(None) | Err(_) => return,
        };
        match fin_opcode & 0x0f {
            opcode @ (0x1 | 0x2) => {
                is_text = opcode == 0x1;
                message = payload;
            }
            0x0 => message.extend_from_slice(&payload),
            0x8 => {
                let _ = client.write(0x88, &payload[..payload.len().min(2)]);
                return;
            }
            0x9 => {
                let _ = client.write(0x8a, &payload);
                continue;
            }
            0xa => continue,
            _ => return client.close(1002),
        }
        if message.len() > MAX_MESSAGE {
            return client.close(1009);
        }
        if fin_opcode & 0x80 == 0 || !is_text {
            continue;
        }
        let parsed = json::parse(&message).ok();
        let kind = parsed.as_ref().and_then(|m| m.get("type")).and_then(Json::as_str);
        if first && kind == Some("feature_flags") {
            let text = format!(r#"{{"type":"feature_flags","data":{}}}"#, api::FEATURES);
            let _ = client.write(0x81, text.as_bytes());
        }
        first = false;
    }
}
