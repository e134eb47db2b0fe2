//! Upgrading a data dir written by an older Ember, in place, when the store opens.
//! Each step rewrites what changed and records the new schema version last, so a crash
//! mid-way repeats the step at the next start (each step is idempotent).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::nodes::{NodeAddress, NodeMark, NodeRecord};
use super::writer::Trees;
use super::{decode, encode, InstanceRecord, StoreError, SCHEMA_VERSION};

const SCHEMA_KEY: &str = "schema_version";

/// Brings the layout to `SCHEMA_VERSION`; refuses a newer one.
pub(super) fn to_current(trees: &Trees) -> Result<(), StoreError> {
    let found = match trees.meta.get(SCHEMA_KEY)? {
        Some(v) => u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4])),
        // A new store (every version wrote the key at its first open).
        None => SCHEMA_VERSION,
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found });
    }
    if found < 2 {
        v1_to_v2(trees)?;
        tracing::info!(from = found, to = 2, "state store upgraded");
    }
    if found < 3 {
        // Nothing to rewrite: JSON history batches read beside packed ones.
        tracing::info!(from = found, to = 3, "state store upgraded");
    }
    trees
        .meta
        .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
    trees.db.flush()?;
    Ok(())
}

/// A node record as version 1 wrote it.
#[derive(Deserialize)]
struct NodeRecordV1 {
    name: String,
    url: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    cordoned: bool,
    #[serde(default)]
    draining: bool,
}

/// Instances keyed by id become `function/id`; node records get an address and a mark.
fn v1_to_v2(trees: &Trees) -> Result<(), StoreError> {
    for entry in trees.instances.iter() {
        let (key, value) = entry?;
        if key.contains(&b'/') {
            continue;
        }
        let record: InstanceRecord = match decode(&key, &value) {
            Ok(r) => r,
            Err(e) => {
                // Its container, if any, is removed at the next reconcile as unexplained.
                tracing::warn!(key = %String::from_utf8_lossy(&key), error = %e, "dropping an unreadable instance record");
                trees.instances.remove(key)?;
                continue;
            }
        };
        let new_key = super::instances::key(&record.function, &record.id);
        trees.instances.insert(new_key, value)?;
        trees.instances.remove(key)?;
    }
    for entry in trees.nodes.iter() {
        let (key, value) = entry?;
        let Ok(old) = decode::<NodeRecordV1>(&key, &value) else {
            continue; // already version 2
        };
        let record = NodeRecord {
            address: if old.url == "embedded" {
                NodeAddress::Embedded
            } else {
                // Agents of version 1 reached the gateway with the long-lived join token
                // and have no credential: they join again when they next start.
                NodeAddress::Agent
            },
            credential: None,
            mark: match (old.cordoned, old.draining) {
                (_, true) => NodeMark::Draining,
                (true, false) => NodeMark::Cordoned,
                (false, false) => NodeMark::None,
            },
            name: old.name,
            labels: old.labels,
        };
        trees.nodes.insert(key, encode(&record))?;
    }
    Ok(())
}
