//! The `instance_logs` tree: what a removed instance last wrote and why it ended, so that
//! `ember logs NAME --previous` can say why a crashed or reaped instance is gone. Keyed
//! `function/ENDED_MS/instance` with the time zero-padded, so one function's records are
//! one prefix scan, oldest first; only the newest `PREVIOUS_PER_FUNCTION` are kept, and
//! they go with their function.

use serde::{Deserialize, Serialize};

use super::{encode, Change, Store, StoreError, TreeId};
use crate::runtime::LogLine;

/// Records kept per function; a newer one pushes the oldest out.
pub const PREVIOUS_PER_FUNCTION: usize = 20;

/// The last output of an instance that was removed, and why it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviousLogs {
    /// Function name.
    pub function: String,
    /// Instance id.
    pub instance: String,
    /// Revision id.
    pub revision: String,
    /// Node name.
    pub node: String,
    /// When it ended (unix ms): when it was taken out of service to be removed.
    pub ended_ms: u64,
    /// Why it was removed, in the gateway's words ("idle", "container stopped", …).
    pub reason: String,
    /// Its container's exit code, when it had exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// The engine's word for its container's state then ("exited", "running", …), when
    /// the node could say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Its last lines (bounded in bytes), oldest first.
    pub lines: Vec<LogLine>,
    /// Whether older output was left out.
    #[serde(default)]
    pub truncated: bool,
}

fn key(function: &str, ended_ms: u64, instance: &str) -> Vec<u8> {
    format!("{function}/{ended_ms:020}/{instance}").into_bytes()
}

/// The key prefix of a function's records.
pub(super) fn prefix(function: &str) -> Vec<u8> {
    format!("{function}/").into_bytes()
}

impl Store {
    /// Keeps an instance's last output, dropping the function's oldest record past
    /// `PREVIOUS_PER_FUNCTION`, without waiting for the disk (losing it in a crash loses
    /// only a diagnosis).
    pub fn put_previous_logs(&self, record: &PreviousLogs) {
        let k = key(&record.function, record.ended_ms, &record.instance);
        self.write_later(vec![
            Change::Put(TreeId::InstanceLogs, k, encode(record)),
            Change::KeepLast(
                TreeId::InstanceLogs,
                prefix(&record.function),
                PREVIOUS_PER_FUNCTION,
            ),
        ]);
    }

    /// A function's kept records, oldest first.
    pub async fn previous_logs(&self, function: &str) -> Result<Vec<PreviousLogs>, StoreError> {
        self.scan(TreeId::InstanceLogs, prefix(function)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::OutputStream;

    fn record(function: &str, instance: &str, ended_ms: u64) -> PreviousLogs {
        PreviousLogs {
            function: function.into(),
            instance: instance.into(),
            revision: "r".into(),
            node: "local".into(),
            ended_ms,
            reason: "container stopped".into(),
            exit_code: Some(3),
            status: Some("exited".into()),
            lines: vec![LogLine {
                stream: OutputStream::Stderr,
                line: format!("{instance} says bye"),
            }],
            truncated: false,
        }
    }

    #[tokio::test]
    async fn previous_logs_come_back_oldest_first_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Out of order, and more than are kept; `fn-2` shares a prefix but is another
        // function.
        let total = PREVIOUS_PER_FUNCTION + 3;
        for i in (0..total).rev() {
            store.put_previous_logs(&record("fn", &format!("i{i}"), 1000 + i as u64));
        }
        store.put_previous_logs(&record("fn-2", "other", 5));
        store.flush().await.unwrap();
        let kept = store.previous_logs("fn").await.unwrap();
        assert_eq!(kept.len(), PREVIOUS_PER_FUNCTION);
        assert_eq!(kept[0].instance, "i3", "the three oldest went");
        assert_eq!(
            kept.last().unwrap(),
            &record("fn", &format!("i{}", total - 1), 1022)
        );
        assert_eq!(store.previous_logs("fn-2").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn previous_logs_go_with_their_function() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_previous_logs(&record("gone", "a", 1));
        store.put_previous_logs(&record("gone-not", "b", 1));
        store.delete_function("gone").await.unwrap();
        assert!(store.previous_logs("gone").await.unwrap().is_empty());
        assert_eq!(store.previous_logs("gone-not").await.unwrap().len(), 1);
    }
}
