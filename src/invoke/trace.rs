//! One call's trace: its invocation id, where it ran, and its history record.
//!
//! A [`Trace`] begins when a request reaches the invoke core and learns where it ran from
//! the permit it got. An answered call's record is sent to the history when its response
//! body has ended (or the client went away): the body is wrapped to count the bytes out
//! and to finish the trace when dropped. A failed call's record is sent at once; one
//! dropped unanswered (the client gone) is recorded as 499 `aborted`.
//!
//! The client learns the id (and whether it waited for a cold start) from the
//! `Ember-Invocation-Id`, `Ember-Cold-Start` and `Ember-Queue-Ms` headers: set on an
//! instance's answer here, and on Ember's own error answers by the gateway, from the
//! [`TagSlot`] the call fills.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Frame, SizeHint};

use crate::activator::{Function, Permit};
use crate::history::{hex_id, mint, now_us, History, InvocationRecord};

/// The header naming the invocation.
pub const INVOCATION_ID: &str = "ember-invocation-id";
/// The header saying the request waited for a cold start.
pub const COLD_START: &str = "ember-cold-start";
/// The header saying how long it waited for an instance, in milliseconds.
pub const QUEUE_MS: &str = "ember-queue-ms";

/// What a response says of its invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tags {
    /// The invocation id.
    pub id: u64,
    /// Whether it waited for an instance to start (or resume).
    pub cold: bool,
    /// How long it waited for an instance, when it waited at all (≥ 1 ms) or was cold.
    pub queue_ms: Option<u64>,
}

impl Tags {
    /// Sets the `Ember-*` headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(INVOCATION_ID, id_value(self.id));
        if self.cold {
            headers.insert(COLD_START, HeaderValue::from_static("true"));
        }
        if let Some(ms) = self.queue_ms {
            headers.insert(QUEUE_MS, HeaderValue::from(ms));
        }
    }
}

fn id_value(id: u64) -> HeaderValue {
    HeaderValue::from_bytes(&hex_id(id)).expect("hex is a header value")
}

/// Where a call leaves its tags for the gateway, which puts them on Ember's own error
/// answers. The gateway puts one in the request's extensions.
#[derive(Debug, Clone, Default)]
pub struct TagSlot(Arc<OnceLock<Tags>>);

impl TagSlot {
    /// The tags, once the call has ended.
    pub fn get(&self) -> Option<Tags> {
        self.0.get().copied()
    }
}

/// Marks a request as a job's attempt: its record says `job`, and its answer carries a
/// [`Ran`] saying where it ran.
#[derive(Debug, Clone, Copy)]
pub struct JobCall;

/// Where a job's attempt ran, in its answer's extensions.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The instance.
    pub instance: String,
    /// Its node.
    pub node: String,
    /// The GPU slots it held.
    pub gpus: Vec<String>,
}

/// One call's trace.
pub struct Trace {
    /// Where it ran, for a job's attempt.
    ran: Option<Ran>,
    job: bool,
    history: Arc<History>,
    id: u64,
    client: Option<SocketAddr>,
    /// The record so far; `None` when the history keeps nothing.
    record: Option<Box<InvocationRecord>>,
    bytes_in: Arc<AtomicU64>,
    cold: bool,
    queued: Duration,
    slot: Option<TagSlot>,
}

impl Trace {
    /// Begins the trace of `request` for `f`.
    pub fn begin(
        history: &Arc<History>,
        f: &Function,
        request: &Request<Body>,
        client: Option<SocketAddr>,
    ) -> Trace {
        let id = mint();
        let job = request.extensions().get::<JobCall>().is_some();
        let record = history.enabled().then(|| {
            Box::new(InvocationRecord {
                id: String::new(), // written by the recorder, off the request's path
                kind: if job { "job" } else { "request" }.into(),
                function: f.name().to_string(),
                revision: f.revision().id.clone(),
                instance: None,
                node: None,
                gpus: Vec::new(),
                client: None,
                method: request.method().as_str().to_owned(),
                path: request.uri().path().to_string(),
                status: 0,
                error: None,
                cold: false,
                queued_at_us: now_us(),
                started_at_us: None,
                finished_at_us: 0,
                bytes_in: 0,
                bytes_out: 0,
            })
        });
        Trace {
            ran: None,
            job,
            history: history.clone(),
            id,
            client,
            record,
            bytes_in: Arc::default(),
            cold: false,
            queued: Duration::ZERO,
            slot: request.extensions().get::<TagSlot>().cloned(),
        }
    }

    /// Names the invocation in the request's headers (`Ember-Invocation-Id`), replacing
    /// any the client sent.
    pub fn tag_request(&self, headers: &mut HeaderMap) {
        headers.insert(INVOCATION_ID, id_value(self.id));
    }

    /// The request body, wrapped to count the bytes read of it unless its length was
    /// announced (then that is its size).
    pub fn count_in(&self, body: Body, announced: Option<u64>) -> Body {
        match (&self.record, announced) {
            (None, _) => body,
            (Some(_), Some(len)) => {
                self.bytes_in.store(len, Ordering::Relaxed);
                body
            }
            (Some(_), None) => Body::new(Counted {
                inner: body,
                bytes: self.bytes_in.clone(),
                finish: None,
            }),
        }
    }

    /// The call got `permit` after waiting `waited` for it.
    pub fn placed(&mut self, permit: &Permit, waited: Duration) {
        self.cold |= permit.cold();
        self.queued += waited;
        if self.job {
            self.ran = Some(Ran {
                instance: permit.instance().to_string(),
                node: permit.node().name().to_string(),
                gpus: permit.devices().to_vec(),
            });
        }
        if let Some(r) = &mut self.record {
            r.revision = permit.revision().to_string();
            r.instance = Some(permit.instance().to_string());
            r.node = Some(permit.node().name().to_string());
            r.gpus = permit.devices().to_vec();
            r.started_at_us = Some(now_us());
        }
    }

    /// Whether it waited for a cold start.
    pub fn cold(&self) -> bool {
        self.cold
    }

    fn tags(&self) -> Tags {
        let waited = self.queued.as_millis() as u64;
        Tags {
            id: self.id,
            cold: self.cold,
            queue_ms: (self.cold || waited > 0).then_some(waited),
        }
    }

    /// Fills the call's tag slot and returns its tags.
    fn settle_tags(&self) -> Tags {
        let tags = self.tags();
        if let Some(slot) = &self.slot {
            let _ = slot.0.set(tags);
        }
        tags
    }

    /// The record, closed with the status the client got (and Ember's error code), to be
    /// sent once its bytes out are known; `None` when the history keeps nothing.
    fn take_pending(&mut self, status: u16, error: Option<&str>) -> Option<Pending> {
        let mut record = self.record.take()?;
        record.status = status;
        record.error = error.map(str::to_string);
        record.cold = self.cold;
        Some(Pending {
            history: self.history.clone(),
            id: self.id,
            client: self.client,
            record,
            bytes_in: self.bytes_in.clone(),
            bytes_out: Arc::default(),
        })
    }

    /// An instance answered: the headers are set, and the record goes to the history when
    /// the body has ended.
    pub fn answered(mut self, response: Response<Body>) -> Response<Body> {
        let tags = self.settle_tags();
        let (mut head, body) = response.into_parts();
        tags.apply(&mut head.headers);
        if let Some(ran) = self.ran.take() {
            head.extensions.insert(ran);
        }
        let body = match self.take_pending(head.status.as_u16(), None) {
            Some(pending) => Body::new(Counted {
                inner: body,
                bytes: pending.bytes_out.clone(),
                finish: Some(pending),
            }),
            None => body,
        };
        Response::from_parts(head, body)
    }

    /// Ember answered instead of an instance, with `status` and its error `code`.
    pub fn failed(mut self, status: u16, code: &str) {
        self.settle_tags();
        if let Some(pending) = self.take_pending(status, Some(code)) {
            pending.send();
        }
    }
}

impl Drop for Trace {
    /// A call dropped before it was answered or failed (the client went away while it
    /// waited, say for a cold start) is recorded as 499 `aborted`, as the metrics count it.
    fn drop(&mut self) {
        if let Some(pending) = self.take_pending(499, Some("aborted")) {
            pending.send();
        }
    }
}

/// A record waiting for its response body to end.
struct Pending {
    history: Arc<History>,
    id: u64,
    client: Option<SocketAddr>,
    record: Box<InvocationRecord>,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
}

impl Pending {
    fn send(mut self) {
        self.record.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        self.record.bytes_out = self.bytes_out.load(Ordering::Relaxed);
        self.record.finished_at_us = now_us();
        self.history.invocation(self.id, self.client, *self.record);
    }
}

/// A body that counts the bytes that pass through it; a response's also sends its
/// call's record when it is dropped (ended, or the client gone).
struct Counted {
    inner: Body,
    bytes: Arc<AtomicU64>,
    finish: Option<Pending>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(pending) = self.finish.take() {
            pending.send();
        }
    }
}
