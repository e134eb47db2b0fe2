//! A node's tunnel session: from the moment its agent's upgraded connection arrives until
//! it closes. The gateway learns the node over it, reconciles what it runs before it takes
//! placements, and asks for its GPUs every heartbeat interval; when the connection ends,
//! the node is `disconnected` (and lost later, if it does not come back in time).

use std::sync::Arc;

use hyper::upgrade::{OnUpgrade, Upgraded};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Membership;
use crate::model::NodeState;
use crate::node::tunnel;
use crate::node::wire::{Heartbeat, NodeInfo};
use crate::node::{Node, RemoteNode};
use crate::store::{NodeMark, NodeRecord};

impl Membership {
    /// Serves node `name`'s tunnel, opened with the credential of hash `credential`, once
    /// the connection is upgraded; the session runs on the membership's own tasks.
    pub fn spawn_session(self: Arc<Self>, name: String, credential: String, on_upgrade: OnUpgrade) {
        let span = tracing::info_span!("tunnel", node = %name);
        let tunnels = self.tunnels.clone();
        tunnels.spawn(
            async move {
                match on_upgrade.await {
                    Ok(upgraded) => self.serve_tunnel(name, credential, upgraded).await,
                    Err(e) => tracing::warn!(error = %e, "the tunnel's upgrade failed"),
                }
            }
            .instrument(span),
        );
    }

    /// Serves the tunnel until it closes, a newer one replaces it, the node is removed, or
    /// the gateway closes its tunnels.
    async fn serve_tunnel(self: Arc<Self>, name: String, credential: String, upgraded: Upgraded) {
        let stop = CancellationToken::new();
        let (tunnel, drive) = match tunnel::accept(upgraded, stop.clone()).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "tunnel handshake failed");
                return;
            }
        };
        let Some((remote, id, record)) = self.open_session(&name, &credential, tunnel, &stop)
        else {
            tracing::warn!(node = %name, "the node was removed, or joined again, as its tunnel opened; closing it");
            stop.cancel();
            return;
        };
        tracing::info!(node = %name, "tunnel open");
        tokio::select! {
            () = drive => {}
            () = self.session(&remote, id, &record) => {}
            () = stop.cancelled() => {}
            () = self.closing.cancelled() => {}
        }
        // Whatever ended the session, the connection ends with it, open streams included.
        stop.cancel();
        if remote.detach(id) {
            self.end_session(&name, id);
            let state = self.scheduler().state(&name);
            if state.is_some_and(|s| s.reachable()) {
                self.scheduler().set_state(&name, NodeState::Disconnected);
            }
            tracing::warn!(node = %name, "tunnel closed: node disconnected");
        }
    }

    /// Checks again, under the sessions lock, that the node still holds `credential` (a
    /// removal or a new join may have come between the check and the upgrade), then makes
    /// the tunnel the node's and its session the current one, closing any older one. The
    /// lock orders sessions: the newest tunnel is always the node's.
    fn open_session(
        &self,
        name: &str,
        credential: &str,
        tunnel: tunnel::Tunnel,
        stop: &CancellationToken,
    ) -> Option<(Arc<RemoteNode>, u64, NodeRecord)> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.store.node(name).ok().flatten()?;
        let holds = record
            .credential
            .as_deref()
            .is_some_and(|h| crate::access::same_secret(h, credential));
        if !holds {
            return None;
        }
        let remote = self.remote_or_new(name, &record);
        let id = remote.attach(tunnel);
        let older = sessions.insert(name.to_string(), (id, stop.clone()));
        if let Some((_, older)) = older {
            older.cancel();
        }
        Some((remote, id, record))
    }

    /// Whether session `id` is still the node's; `then` runs under the sessions lock when
    /// it is (so a removal, which ends the session under that lock, cannot come between).
    fn while_current(&self, name: &str, id: u64, then: impl FnOnce()) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let current = sessions.get(name).is_some_and(|(c, _)| *c == id);
        if current {
            then();
        }
        current
    }

    /// Forgets session `id` of `name` if it is still the node's.
    fn end_session(&self, name: &str, id: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions
            .get(name)
            .is_some_and(|(current, _)| *current == id)
        {
            sessions.remove(name);
        }
    }

    /// Learns the node, brings it in, then keeps asking for its GPUs. Returns (ending the
    /// session) when the node misbehaves; its agent then dials again.
    async fn session(&self, remote: &Arc<RemoteNode>, id: u64, record: &NodeRecord) {
        let info = match remote.info().await {
            Ok(info) if info.name == remote.name() => info,
            Ok(info) => {
                tracing::warn!(node = %remote.name(), says = %info.name, "the agent names itself otherwise; closing its tunnel");
                return;
            }
            Err(e) => {
                tracing::warn!(node = %remote.name(), error = %e, "the agent did not describe itself; closing its tunnel");
                return;
            }
        };
        if !self.while_current(remote.name(), id, || {
            self.came_up(remote, &info, record.mark)
        }) {
            return;
        }
        let name = remote.name().to_string();
        let every = self.timing.heartbeat;
        let patience = (every * 3).max(std::time::Duration::from_secs(5));
        let mut failing = false;
        loop {
            tokio::time::sleep(every).await;
            match remote.inventory(patience).await {
                Ok(hb) => {
                    if failing {
                        tracing::info!(node = %remote.name(), "node answers again");
                    }
                    failing = false;
                    self.reported(remote, &hb);
                    // Still held: its reconcile failed; try again.
                    if self.scheduler().state(&name) == Some(NodeState::Disconnected) {
                        self.reconcile_then_release(remote);
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(node = %remote.name(), error = %e, "node does not answer its inventory call");
                    }
                    failing = true;
                }
            }
        }
    }

    /// The node is back (or new): waiting requests may use its instances at once; it
    /// takes placements once what it runs is reconciled.
    fn came_up(&self, remote: &Arc<RemoteNode>, info: &NodeInfo, mark: NodeMark) {
        let name = remote.name().to_string();
        remote.described(info);
        let before = self.scheduler().state(&name);
        let held = !before.is_some_and(|s| s.reachable());
        let state = if held {
            NodeState::Disconnected
        } else {
            mark.state()
        };
        self.scheduler()
            .add_node(remote.clone(), info.labels.clone(), state);
        tracing::info!(node = %name, gpus = info.gpus.len(), labels = info.labels.len(), "node up");
        self.reported(
            remote,
            &Heartbeat {
                gpus: info.gpus.clone(),
                volumes: info.volumes.clone(),
            },
        );
        self.activator.node_reachable(&name);
        // A new tunnel always reconciles: what ran while it was away is adopted, never
        // started twice.
        self.reconcile_then_release(remote);
    }

    /// Reconciles the node in the background; a node held out of placement (state
    /// `disconnected` while its tunnel is open) takes placements again once that worked,
    /// under its operator's mark.
    fn reconcile_then_release(&self, remote: &Arc<RemoteNode>) {
        let name = remote.name().to_string();
        let Some(guard) = self.activator.begin_reconcile(&name) else {
            return;
        };
        let (activator, store, remote) =
            (self.activator.clone(), self.store.clone(), remote.clone());
        let span = tracing::info_span!("reconcile", node = %name);
        self.activator.tracker().spawn(
            async move {
                if !guard.reconcile(remote).await {
                    return;
                }
                let scheduler = activator.scheduler();
                if scheduler.state(&name) == Some(NodeState::Disconnected) {
                    let mark = match store.node(&name) {
                        Ok(record) => record.map(|r| r.mark).unwrap_or_default(),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the node's mark; taking it as ready");
                            NodeMark::None
                        }
                    };
                    scheduler.set_state(&name, mark.state());
                }
            }
            .instrument(span),
        );
    }

    /// Takes a node's GPU report; instances on GPUs that vanished are dropped.
    fn reported(&self, remote: &RemoteNode, hb: &Heartbeat) {
        remote.heartbeat(hb);
        let name = remote.name();
        self.scheduler().update_volumes(name, hb.volumes.clone());
        if self.scheduler().update_gpus(name, hb.gpus.clone()) {
            self.activator.drop_missing_gpus(name, &hb.gpus);
        }
    }
}
