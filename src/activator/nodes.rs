//! What happens to instances when their node changes: lost (dropped and replaced
//! elsewhere), drained (replaced elsewhere first, then stopped when idle), or back with
//! fewer GPUs (instances on the missing ones dropped).

use super::reap::take_victims;
use super::Activator;
use crate::gpu::GpuInfo;

impl Activator {
    /// Forgets every instance on a lost node; requests waiting for capacity place
    /// replacements elsewhere. Its containers are not touched (the node cannot be reached);
    /// if it comes back, reconciling removes them.
    pub async fn forget_node(&self, node: &str) {
        let mut forgotten = Vec::new();
        for f in self.functions() {
            let mut st = f.lock();
            let before = st.instances.len();
            st.instances.retain(|i| {
                let gone = i.reservation.node().name() == node;
                if gone {
                    forgotten.push((f.name().to_string(), i.id.clone()));
                }
                !gone
            });
            if st.instances.len() != before {
                self.scale_up(&f, &mut st);
            }
        }
        self.forget_records(&forgotten).await;
        tracing::warn!(
            node,
            instances = forgotten.len(),
            "node lost: its instances are dropped"
        );
    }

    /// The node can be reached again: requests waiting for its instances get them.
    pub fn node_reachable(&self, node: &str) {
        for f in self.functions() {
            let mut st = f.lock();
            if st
                .instances
                .iter()
                .any(|i| i.reservation.node().name() == node)
            {
                f.dispatch(&mut st);
            }
        }
    }

    /// Marks the node's instances as leaving: they serve until replacements elsewhere are
    /// ready (as demand and `min` ask), then stop once idle.
    pub fn drain_node(&self, node: &str) {
        for f in self.functions() {
            let mut st = f.lock();
            let mut any = false;
            for i in st
                .instances
                .iter_mut()
                .filter(|i| i.reservation.node().name() == node)
            {
                i.evacuating = true;
                any = true;
            }
            if any {
                self.scale_up(&f, &mut st);
            }
        }
        self.reaper().notify_one();
    }

    /// Undoes `drain_node` for the instances still there.
    pub fn undrain_node(&self, node: &str) {
        for f in self.functions() {
            let mut st = f.lock();
            for i in st
                .instances
                .iter_mut()
                .filter(|i| i.reservation.node().name() == node)
            {
                i.evacuating = false;
            }
        }
    }

    /// Drops instances holding GPUs the node no longer reports.
    pub fn drop_missing_gpus(&self, node: &str, gpus: &[GpuInfo]) {
        let present = crate::gpu::device_ids(gpus);
        for f in self.functions() {
            let victims = {
                let mut st = f.lock();
                let missing: Vec<usize> = st
                    .instances
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| {
                        i.reservation.node().name() == node
                            && i.reservation
                                .gpus()
                                .iter()
                                .any(|g| !present.contains(&g.device_id))
                    })
                    .map(|(idx, _)| idx)
                    .collect();
                take_victims(&mut st.instances, &missing)
            };
            if !victims.is_empty() {
                self.stop_in_background(f, victims, "its GPU is gone from the node");
            }
        }
    }
}
