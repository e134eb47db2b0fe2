//! WebSocket pass-through. A client's `Upgrade: websocket` request goes to the instance
//! with its upgrade headers kept (they are hop-by-hop, stripped from every other request);
//! when the instance answers 101, the client gets the 101 with the instance's headers
//! (`Sec-WebSocket-Accept`, the chosen subprotocol…), both connections leave HTTP, and their
//! bytes are spliced both ways until either side closes. Any other answer is passed
//! through as a plain response.
//!
//! The splice holds the instance's permit: the socket counts as a request in flight, so
//! autoscaling sees it and the reaper neither pauses nor retires the instance under it. It
//! ends when the instance is retired (drained for a new revision or a node drain, stopped,
//! removed, lost) or the gateway shuts down: the client then gets a Close frame (1001,
//! going away) when what it was sent so far ends on a frame boundary, and both connections
//! are shut down. `request.timeout` bounds the wait for the 101 only.
//!
//! Only WebSocket is passed through: other `Upgrade` protocols are stripped, and the
//! request goes on as a plain one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::Request;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::activator::Permit;

/// How long one side of a socket may take to close after the other has, and how long
/// closing a retired instance's socket may take (the Close frame, the shutdowns, the
/// client's answer).
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A Close frame from the server, status 1001 (going away, RFC 6455 §7.4.1).
const GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xe9];

/// A client's request to switch to WebSocket, with hyper's handle on its connection.
pub struct UpgradeRequest {
    protocol: HeaderValue,
    client: OnUpgrade,
}

impl std::fmt::Debug for UpgradeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeRequest")
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl UpgradeRequest {
    /// The client's WebSocket upgrade, taken out of `req`, when it asks for one on a
    /// connection that can switch (HTTP/1.1).
    pub fn take_from<B>(req: &mut Request<B>) -> Option<UpgradeRequest> {
        let protocol = websocket_upgrade(req.headers())?;
        let client = req.extensions_mut().remove::<OnUpgrade>()?;
        Some(UpgradeRequest { protocol, client })
    }

    /// Puts the headers that ask to switch back on a request to the instance.
    pub(super) fn ask(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }
}

/// The `Upgrade` value when the headers ask to switch to WebSocket: `Connection` names
/// `upgrade` and `Upgrade` is `websocket`.
fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let tokens = |name| {
        headers
            .get_all(name)
            .into_iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    let connection_upgrades = tokens(header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let websocket = tokens(header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"));
    (connection_upgrades && websocket).then(|| HeaderValue::from_static("websocket"))
}

/// Splices the client's connection to the instance's once both have switched, holding
/// `permit` until the splice ends; closes both when the instance is retired or
/// `shutdown` is cancelled.
pub(super) async fn splice(
    upgrade: UpgradeRequest,
    instance: OnUpgrade,
    permit: Permit,
    shutdown: CancellationToken,
) {
    let retired = permit.retired().clone();
    let ending = async {
        tokio::select! {
            () = retired.cancelled() => "the instance is retired",
            () = shutdown.cancelled() => "the gateway is shutting down",
        }
    };
    tokio::pin!(ending);
    let opened = tokio::select! {
        opened = async { tokio::try_join!(upgrade.client, instance) } => opened,
        _ = ending.as_mut() => return,
    };
    let (client, instance) = match opened {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "a WebSocket did not switch");
            return;
        }
    };
    let (mut from_client, mut to_client) = tokio::io::split(FrameWatch::new(TokioIo::new(client)));
    let (mut from_instance, mut to_instance) = tokio::io::split(TokioIo::new(instance));
    tracing::debug!("WebSocket open");
    let why = {
        let up = pipe(&mut from_client, &mut to_instance);
        let down = pipe(&mut from_instance, &mut to_client);
        tokio::pin!(up, down);
        // Once one side has closed, the other has a grace to follow, and no longer: a
        // client that never closes its end must not hold the instance.
        let spliced = async {
            let other = tokio::select! {
                () = &mut up => down.as_mut().left_future(),
                () = &mut down => up.as_mut().right_future(),
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, other).await;
        };
        tokio::select! {
            () = spliced => None,
            why = ending => Some(why),
        }
    };
    let Some(why) = why else {
        tracing::debug!("WebSocket closed");
        return;
    };
    tracing::debug!(why, "closing a WebSocket");
    let mut client = from_client.unsplit(to_client);
    let mut instance = from_instance.unsplit(to_instance);
    let closed = tokio::time::timeout(CLOSE_GRACE, close(&mut client, &mut instance)).await;
    if closed.is_err() {
        tracing::debug!("the client did not close within the grace; dropping it");
    }
    drop(permit);
}

/// Copies `from` into `to` until `from` ends or either fails, then shuts `to` down.
async fn pipe<R, W>(from: &mut R, to: &mut W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Err(e) = tokio::io::copy(from, to).await {
        tracing::debug!(error = %e, "a WebSocket direction ended with an error");
    }
    let _ = to.shutdown().await;
}

/// Closes both sides of a splice: the instance's connection is shut down; the client is
/// told (a Close frame when it can be sent whole between frames), its connection shut
/// down, and read until it closes, so unread bytes never turn the close into a reset.
async fn close<C, I>(client: &mut FrameWatch<C>, instance: &mut I)
where
    C: AsyncRead + AsyncWrite + Unpin,
    I: AsyncWrite + Unpin,
{
    let _ = instance.shutdown().await;
    if client.boundary.can_close() {
        let _ = client.write_all(&GOING_AWAY).await;
    }
    let _ = client.shutdown().await;
    let mut sink = [0u8; 2048];
    while let Ok(n) = client.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// Where the stream of frames sent to the client stands: inside a frame's header, inside
/// its payload, or between frames; and whether a Close frame went out.
#[derive(Debug, Default)]
struct FrameBoundary {
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
    closed: bool,
}

impl FrameBoundary {
    /// Notes bytes sent to the client.
    fn sent(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if let Some(payload) = header_done(&self.header[..self.header_len]) {
                self.closed |= self.header[0] & 0x0f == 0x8;
                self.payload_left = payload;
                self.header_len = 0;
            }
        }
    }

    /// Whether a Close frame may be sent now: between frames, none sent yet.
    fn can_close(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0 && !self.closed
    }
}

/// The payload length once `header` holds a whole frame header (RFC 6455 §5.2).
fn header_done(header: &[u8]) -> Option<u64> {
    let second = *header.get(1)?;
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    if header.len() < 2 + extended + mask {
        return None;
    }
    let len = match second & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
        short => u64::from(short),
    };
    Some(len)
}

/// The client's connection, noting the frames written to it.
struct FrameWatch<T> {
    inner: T,
    boundary: FrameBoundary,
}

impl<T> FrameWatch<T> {
    fn new(inner: T) -> FrameWatch<T> {
        FrameWatch {
            inner,
            boundary: FrameBoundary::default(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FrameWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FrameWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.boundary.sent(&buf[..n]);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            0..=125 => f.push(mask_bit | payload_len as u8),
            126..=0xffff => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(b'x', payload_len));
        f
    }

    #[test]
    fn frames_of_every_length_encoding_end_on_a_boundary_however_they_are_split() {
        let mut stream = Vec::new();
        for (len, masked) in [
            (0, false),
            (5, false),
            (125, true),
            (126, false),
            (70_000, true),
        ] {
            stream.extend(frame(0x2, len, masked));
        }
        for chunk in [1, 3, 7, 4096, stream.len()] {
            let mut b = FrameBoundary::default();
            for piece in stream.chunks(chunk) {
                b.sent(piece);
            }
            assert!(b.can_close(), "split every {chunk} bytes");
        }
    }

    #[test]
    fn a_close_frame_is_not_sent_inside_a_frame_or_after_the_instances_own_close() {
        let text = frame(0x1, 300, false);
        let mut b = FrameBoundary::default();
        b.sent(&text[..1]);
        assert!(!b.can_close(), "inside a header");
        b.sent(&text[1..10]);
        assert!(!b.can_close(), "inside a payload");
        b.sent(&text[10..]);
        assert!(b.can_close());
        b.sent(&frame(0x8, 2, false));
        assert!(!b.can_close(), "the instance closed already");
    }

    #[test]
    fn only_a_websocket_upgrade_on_a_connection_that_names_it_is_taken() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert_eq!(websocket_upgrade(&ws).unwrap(), "websocket");
        assert!(websocket_upgrade(&headers(&[("upgrade", "websocket")])).is_none());
        let h2c = headers(&[("connection", "upgrade"), ("upgrade", "h2c")]);
        assert!(websocket_upgrade(&h2c).is_none());
        let req = Request::get("/")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let mut req = req;
        assert!(
            UpgradeRequest::take_from(&mut req).is_none(),
            "no connection to switch (HTTP/2, or a request not from a server connection)"
        );
    }
}
