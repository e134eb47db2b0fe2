//! The clients' sockets: `GET /ws?clientId=X` on the gateway. Each client id of each
//! function has one socket (a reconnect with the same id replaces the old one, as
//! ComfyUI does); a prompt's messages go to its client's socket only, and queue changes
//! (`status`) go to every socket of the function.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Messages a client may fall behind by before its socket is closed (it reconnects and
/// gets the running prompt's state again).
pub const CLIENT_BACKLOG: usize = 4096;

struct Client {
    id: u64,
    tx: mpsc::Sender<Message>,
}

/// Every connected client, by function and client id.
#[derive(Default)]
pub struct Hub {
    clients: Mutex<HashMap<(String, String), Client>>,
    next: AtomicU64,
}

/// One client's socket in the hub: dropping it leaves the hub (unless a reconnect has
/// replaced it already).
pub struct Subscription<'a> {
    hub: &'a Hub,
    key: (String, String),
    id: u64,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut clients = self.hub.lock();
        if clients.get(&self.key).is_some_and(|c| c.id == self.id) {
            clients.remove(&self.key);
        }
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a client's socket, replacing (and so closing) an older one with the id.
    pub fn join(
        &self,
        function: &str,
        client_id: &str,
    ) -> (Subscription<'_>, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(CLIENT_BACKLOG);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let key = (function.to_string(), client_id.to_string());
        self.lock().insert(key.clone(), Client { id, tx });
        (Subscription { hub: self, key, id }, rx)
    }

    /// Sends a message to one client, if connected. A client too far behind is dropped.
    pub fn send(&self, function: &str, client_id: &str, message: Message) {
        let mut clients = self.lock();
        let key = (function.to_string(), client_id.to_string());
        if let Some(client) = clients.get(&key) {
            if client.tx.try_send(message).is_err() {
                tracing::warn!(
                    function,
                    client_id,
                    "a ComfyUI client fell behind; closing its socket"
                );
                clients.remove(&key);
            }
        }
    }

    /// Sends a message to every client of `function`.
    pub fn broadcast(&self, function: &str, message: &Message) {
        let mut clients = self.lock();
        clients
            .retain(|(f, _), client| f != function || client.tx.try_send(message.clone()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reaches_its_client_only_and_a_reconnect_replaces_the_old_socket() {
        let hub = Hub::default();
        let (a, mut a_rx) = hub.join("f", "a");
        let (_b, mut b_rx) = hub.join("f", "b");
        let (_other, mut other_rx) = hub.join("g", "a");
        hub.send("f", "a", Message::text("for a"));
        assert_eq!(a_rx.try_recv().unwrap(), Message::text("for a"));
        assert!(b_rx.try_recv().is_err());
        assert!(other_rx.try_recv().is_err());
        hub.broadcast("f", &Message::text("all"));
        assert!(a_rx.try_recv().is_ok() && b_rx.try_recv().is_ok());
        assert!(other_rx.try_recv().is_err());

        let (_a2, mut a2_rx) = hub.join("f", "a");
        // The old socket's channel is closed; its leaving does not remove the new one.
        assert!(a_rx.blocking_recv().is_none());
        drop(a);
        hub.send("f", "a", Message::text("again"));
        assert_eq!(a2_rx.try_recv().unwrap(), Message::text("again"));
    }
}
