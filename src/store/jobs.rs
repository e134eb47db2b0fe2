//! The `jobs`, `job_inputs` and `job_results` trees: durable asynchronous invocations.
//!
//! - `jobs`: job id (8 bytes, big-endian; ids grow with submission time) → [`JobRecord`].
//! - `job_inputs`: job id → the input body, raw bytes (its content type is in the record).
//! - `job_results`: job id → the function's answer body, raw bytes (status and headers
//!   are in the record).
//! - `job_keys`: `function\nIdempotency-Key` → the job it made and its input's hash.
//! - `job_outbox`: job id → a callback still to send ([`OutboxEntry`]).
//!
//! Bodies are stored as they are, not in the JSON envelope: they are the user's bytes, up
//! to 10 MiB, and their metadata is in the (enveloped) record. A submission is one write
//! of the record and its input that resolves once it is on disk (the store's writer
//! flushes once per batch: a burst of submissions shares one flush).

use serde::{Deserialize, Serialize};

use super::{decode, encode, Change, Store, StoreError, TreeId};

/// Where a job is.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to run (or to run again after a retryable failure).
    Queued,
    /// An attempt is under way.
    Running,
    /// The function answered 2xx or 3xx; its answer is the result.
    Succeeded,
    /// The function answered a final error, or every attempt failed.
    Failed,
    /// Cancelled before it ended.
    Cancelled,
    /// Still queued when its time to live ran out: it never started.
    Expired,
}

impl JobState {
    /// The state as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
        }
    }

    /// Every state, as [`JobState::as_str`] writes them.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Expired,
    ];

    /// The state the API writes as `name`.
    pub fn parse(name: &str) -> Option<JobState> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Expired
        )
    }
}

/// How a job takes capacity.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Like a request: it starts and scales instances.
    #[default]
    Normal,
    /// Only on a ready instance's free slot: never starts, resumes or adds an instance.
    Low,
}

/// One job.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id: 32 hex digits, the store key then 64 random bits.
    pub id: String,
    /// The function it runs on.
    pub function: String,
    /// Where it is.
    pub state: JobState,
    /// Attempts begun so far.
    pub attempt: u32,
    /// Attempts it may take.
    pub max_attempts: u32,
    /// How it takes capacity.
    #[serde(default)]
    pub priority: Priority,
    /// The path the function is sent (`/` by default), with its query.
    pub path: String,
    /// The input's content type.
    pub content_type: Option<String>,
    /// The input's size.
    pub input_bytes: u64,
    /// When it was submitted (unix ms).
    pub submitted_ms: u64,
    /// Not to start before (unix ms): the back-off of a retry.
    pub not_before_ms: u64,
    /// When its last attempt began.
    pub started_ms: Option<u64>,
    /// When it ended.
    pub finished_ms: Option<u64>,
    /// The instance of its last attempt.
    pub instance: Option<String>,
    /// That instance's node.
    pub node: Option<String>,
    /// The GPU slots that instance held.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// The function's status, once it answered.
    pub status: Option<u16>,
    /// The function's answer headers, once it answered: `[name, value]` pairs.
    #[serde(default)]
    #[schema(value_type = Vec<Vec<String>>)]
    pub headers: Vec<(String, String)>,
    /// Why it failed (or why the last attempt did).
    pub error: Option<String>,
    /// The answer body's size, once stored.
    pub result_bytes: Option<u64>,
    /// Where its end is POSTed (`X-Callback-Url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

/// A callback to send (`job_outbox`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Where.
    pub url: String,
    /// Deliveries tried so far.
    pub attempts: u32,
    /// Not before (unix ms).
    pub next_ms: u64,
}

/// What [`Store::sweep_jobs`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JobsSwept {
    /// Jobs whose input and answer were removed.
    pub bodies: usize,
    /// Jobs removed whole.
    pub records: usize,
    /// Idempotency keys removed.
    pub keys: usize,
}

/// The store key of job id `id`: its first 16 hex digits (the 16 after them, in ids made
/// since they were added, are random: what makes an id unguessable).
pub fn job_key(id: &str) -> Option<u64> {
    if !(id.len() == 16 || id.len() == 32) || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(&id[..16], 16).ok()
}

/// The job id a `jobs`-keyed tree's key holds.
fn id_of(k: &[u8]) -> u64 {
    u64::from_be_bytes(k.try_into().unwrap_or([0; 8]))
}

fn key(id: u64) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

impl Store {
    /// Stores a new job, its input, and the idempotency key naming it when it has one
    /// (`(key, input hash)`); resolves once all are on disk.
    pub async fn put_job(
        &self,
        id: u64,
        job: &JobRecord,
        input: Vec<u8>,
        idempotency: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        // The input first: a crash that keeps part of the batch never leaves a record
        // without its input.
        let mut changes = vec![
            Change::Put(TreeId::JobInputs, key(id), input),
            Change::Put(TreeId::Jobs, key(id), encode(job)),
        ];
        if let Some((idem, hash)) = idempotency {
            changes.push(Change::Put(
                TreeId::JobKeys,
                format!("{}\n{idem}", job.function).into_bytes(),
                encode(&(job.id.clone(), hash.to_string())),
            ));
        }
        self.write(changes).await
    }

    /// Stores a job's new state (and its answer's body, when it has one); resolves once on
    /// disk.
    pub async fn update_job(
        &self,
        id: u64,
        job: &JobRecord,
        result: Option<Vec<u8>>,
        callback: Option<&OutboxEntry>,
    ) -> Result<(), StoreError> {
        let mut changes = Vec::new();
        if let Some(body) = result {
            changes.push(Change::Put(TreeId::JobResults, key(id), body));
        }
        changes.push(Change::Put(TreeId::Jobs, key(id), encode(job)));
        if let Some(entry) = callback {
            changes.push(Change::Put(TreeId::JobOutbox, key(id), encode(entry)));
        }
        self.write(changes).await
    }

    /// Callbacks due at `now_ms`.
    pub async fn outbox_due(&self, now_ms: u64) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            let mut due = Vec::new();
            for entry in trees.tree(TreeId::JobOutbox).iter() {
                let (k, v) = entry?;
                let e: OutboxEntry = decode(&k, &v)?;
                if e.next_ms <= now_ms {
                    due.push((id_of(&k), e));
                }
            }
            Ok(due)
        })
        .await
        .map_err(StoreError::Scan)?
    }

    /// Stores a callback's next try.
    pub async fn put_outbox(&self, id: u64, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.write(vec![Change::Put(TreeId::JobOutbox, key(id), encode(entry))])
            .await
    }

    /// Forgets a callback (sent, or given up).
    pub async fn remove_outbox(&self, id: u64) -> Result<(), StoreError> {
        self.write(vec![Change::Remove(TreeId::JobOutbox, key(id))])
            .await
    }

    /// A job.
    pub fn job(&self, id: u64) -> Result<Option<JobRecord>, StoreError> {
        self.get(TreeId::Jobs, &key(id))
    }

    /// A job's input.
    pub fn job_input(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.trees.tree(TreeId::JobInputs).get(key(id))?;
        Ok(v.map(|v| v.to_vec()))
    }

    /// A job's answer body.
    pub fn job_result(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.trees.tree(TreeId::JobResults).get(key(id))?;
        Ok(v.map(|v| v.to_vec()))
    }

    /// Jobs with ids below `below_id`, newest first, that `keep` accepts, at most `limit`.
    pub async fn jobs_page(
        &self,
        below_id: u64,
        limit: usize,
        keep: impl Fn(&JobRecord) -> bool + Send + 'static,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for entry in trees.tree(TreeId::Jobs).range(..key(below_id)).rev() {
                let (k, v) = entry?;
                let job: JobRecord = decode(&k, &v)?;
                if keep(&job) {
                    out.push(job);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(StoreError::Scan)?
    }

    /// Folds every job, oldest first, into `acc`, without collecting them.
    pub async fn fold_jobs<A: Send + 'static>(
        &self,
        acc: A,
        f: impl Fn(A, &JobRecord) -> A + Send + 'static,
    ) -> Result<A, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            let mut acc = acc;
            for entry in trees.tree(TreeId::Jobs).iter() {
                let (k, v) = entry?;
                acc = f(acc, &decode(&k, &v)?);
            }
            Ok(acc)
        })
        .await
        .map_err(StoreError::Scan)?
    }

    /// The job an idempotency key of `function` named, with the hash of its input.
    pub fn job_by_key(
        &self,
        function: &str,
        idem: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        self.get(TreeId::JobKeys, format!("{function}\n{idem}").as_bytes())
    }

    /// Removes the input and answer of jobs that ended before `bodies_before_ms` (their
    /// result is then gone: no answer body stored), whole
    /// jobs that ended before `records_before_ms`, and idempotency keys of jobs submitted
    /// before `keys_before_ms` (or gone); waits for the disk.
    pub async fn sweep_jobs(
        &self,
        bodies_before_ms: u64,
        records_before_ms: u64,
        keys_before_ms: u64,
    ) -> Result<JobsSwept, StoreError> {
        let trees = self.trees.clone();
        let (changes, swept) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let mut changes = Vec::new();
            let mut swept = JobsSwept::default();
            for entry in trees.tree(TreeId::Jobs).iter() {
                let (k, v) = entry?;
                let job: JobRecord = decode(&k, &v)?;
                let Some(ended) = job.finished_ms.filter(|_| job.state.is_terminal()) else {
                    continue;
                };
                // The record itself is never rewritten here: a retry may be changing it.
                if ended < records_before_ms {
                    changes.push(Change::Remove(TreeId::Jobs, k.to_vec()));
                    swept.records += 1;
                } else if ended < bodies_before_ms
                    && trees.tree(TreeId::JobInputs).contains_key(&k)?
                {
                    swept.bodies += 1;
                } else {
                    continue;
                }
                changes.push(Change::Remove(TreeId::JobInputs, k.to_vec()));
                changes.push(Change::Remove(TreeId::JobResults, k.to_vec()));
            }
            for entry in trees.tree(TreeId::JobKeys).iter() {
                let (k, v) = entry?;
                let (job, _): (String, String) = decode(&k, &v)?;
                let submitted = job_key(&job).and_then(|id| {
                    let v = trees.tree(TreeId::Jobs).get(key(id)).ok()??;
                    decode::<JobRecord>(&key(id), &v)
                        .ok()
                        .map(|j| j.submitted_ms)
                });
                if submitted.is_none_or(|t| t < keys_before_ms) {
                    changes.push(Change::Remove(TreeId::JobKeys, k.to_vec()));
                    swept.keys += 1;
                }
            }
            Ok((changes, swept))
        })
        .await
        .map_err(StoreError::Scan)??;
        if !changes.is_empty() {
            self.write(changes).await?;
        }
        Ok(swept)
    }

    /// Every job not over (queued or running), oldest first: what a restart resumes.
    pub async fn unfinished_jobs(&self) -> Result<Vec<(u64, JobRecord)>, StoreError> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for entry in trees.tree(TreeId::Jobs).iter() {
                let (k, v) = entry?;
                let job: JobRecord = decode(&k, &v)?;
                if !job.state.is_terminal() {
                    out.push((id_of(&k), job));
                }
            }
            Ok(out)
        })
        .await
        .map_err(StoreError::Scan)?
    }
}

#[cfg(test)]
mod tests {
    use super::JobState;

    #[test]
    fn a_state_reads_back_from_the_name_the_api_writes() {
        for s in JobState::ALL {
            let serde_name = serde_json::to_value(s).unwrap();
            assert_eq!(serde_name, s.as_str(), "as_str is serde's name");
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("done"), None);
    }
}
