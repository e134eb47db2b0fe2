//! The bodies the proxy streams: a request body that can be taken back while nothing of
//! it has been read, one that fails past the function's limit, and a response body that
//! holds the instance's permit until it is finished or dropped.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::ProxyError;
use crate::activator::Permit;

type Slot = Arc<Mutex<Option<Body>>>;

/// A request body that stays in a shared slot until hyper first reads it. When a send
/// fails before that (no connection to the instance could be made), `Reclaim::take`
/// gives the untouched body back, so the request can go to another instance whatever its
/// method and size. Once a byte has been read, the body belongs to that attempt.
pub struct ReclaimableBody {
    slot: Slot,
    body: Option<Body>,
    end_stream: bool,
    size_hint: SizeHint,
}

/// The other end of a `ReclaimableBody`.
pub struct Reclaim {
    slot: Slot,
}

impl ReclaimableBody {
    /// Wraps `body`; the `Reclaim` takes it back while it is unread.
    pub fn new(body: Body) -> (ReclaimableBody, Reclaim) {
        let end_stream = http_body::Body::is_end_stream(&body);
        let size_hint = http_body::Body::size_hint(&body);
        let slot = Arc::new(Mutex::new(Some(body)));
        (
            ReclaimableBody {
                slot: slot.clone(),
                body: None,
                end_stream,
                size_hint,
            },
            Reclaim { slot },
        )
    }
}

impl Reclaim {
    /// The body, if nothing of it was read.
    pub fn take(self) -> Option<Body> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl http_body::Body for ReclaimableBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.body.is_none() {
            let taken = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                Some(body) => self.body = Some(body),
                // Reclaimed for another attempt: this one has nothing to send.
                None => return Poll::Ready(None),
            }
        }
        let body = self.body.as_mut().expect("taken above");
        Pin::new(body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(b) => b.is_end_stream(),
            None => self.end_stream,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => self.size_hint,
        }
    }
}

/// A request body that fails once more than `limit` bytes have passed.
pub struct LimitedBody {
    inner: ReclaimableBody,
    remaining: u64,
    limit: u64,
    tripped: Arc<AtomicBool>,
}

impl LimitedBody {
    /// `inner`, cut off past `limit` bytes; `tripped` says whether it was.
    pub fn new(inner: ReclaimableBody, limit: u64, tripped: Arc<AtomicBool>) -> LimitedBody {
        LimitedBody {
            inner,
            remaining: limit,
            limit,
            tripped,
        }
    }
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.tripped.store(true, Ordering::Release);
                        let limit = self.limit;
                        return Poll::Ready(Some(Err(ProxyError::BodyTooLarge { limit }.into())));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds the permit until it is finished or dropped.
pub(super) struct PermitBody {
    inner: hyper::body::Incoming,
    _permit: Permit,
}

impl PermitBody {
    pub(super) fn new(inner: hyper::body::Incoming, permit: Permit) -> PermitBody {
        PermitBody {
            inner,
            _permit: permit,
        }
    }
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn limited(text: &'static str, limit: u64) -> (LimitedBody, Arc<AtomicBool>) {
        let tripped = Arc::new(AtomicBool::new(false));
        let (body, _) = ReclaimableBody::new(Body::from(text));
        (LimitedBody::new(body, limit, tripped.clone()), tripped)
    }

    #[tokio::test]
    async fn limited_body_passes_bodies_within_the_limit() {
        let (body, tripped) = limited("hello", 5);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert!(!tripped.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn limited_body_fails_and_says_so_past_the_limit() {
        let (body, tripped) = limited("hello world", 5);
        assert!(body.collect().await.is_err());
        assert!(tripped.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn an_unread_body_is_reclaimed_whole_with_its_size() {
        let (body, reclaim) = ReclaimableBody::new(Body::from("payload"));
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(7));
        drop(body);
        let back = reclaim.take().expect("never read");
        assert_eq!(back.collect().await.unwrap().to_bytes(), "payload");
    }

    #[tokio::test]
    async fn a_body_once_read_cannot_be_reclaimed() {
        let (mut body, reclaim) = ReclaimableBody::new(Body::from("payload"));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "payload");
        assert!(reclaim.take().is_none());
    }
}
