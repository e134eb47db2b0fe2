//! A WebSocket client for the tests (tokio-tungstenite): sockets to a gateway's
//! `/fn/NAME/...` over plain TCP or the gateway's TLS, an echo check, and the close a
//! retired instance's socket must end with.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::Gateway;

/// A socket over plain TCP.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for one answer.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Opens `ws://ADDR/PATH` (`url` is `http://ADDR`); panics unless the handshake succeeds.
pub async fn open(url: &str, path: &str) -> Socket {
    try_open(url, path)
        .await
        .unwrap_or_else(|e| panic!("WebSocket to {url}{path} failed: {e}"))
}

/// Opens `ws://ADDR/PATH`, or says why not.
pub async fn try_open(url: &str, path: &str) -> Result<Socket, Error> {
    let ws_url = format!("{}{path}", url.replacen("http://", "ws://", 1));
    let (socket, response) = tokio_tungstenite::connect_async(ws_url).await?;
    assert_eq!(response.status(), 101);
    Ok(socket)
}

/// Opens `wss://…/PATH` on a gateway serving `--tls self-signed`, trusting its CA.
pub async fn open_tls(
    gw: &Gateway,
    path: &str,
) -> WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let authority = gw.url.trim_start_matches("https://").to_string();
    let addr: std::net::SocketAddr = authority.parse().unwrap();
    let trust = ember::tls::Trust::CaFile(gw.ca_file());
    let config = trust.client_config(&[]).expect("the gateway's CA");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS to the gateway");
    let url = format!("wss://{authority}{path}");
    let (socket, response) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("a WebSocket handshake over TLS");
    assert_eq!(response.status(), 101);
    socket
}

/// The next message, within `ANSWER_WITHIN`.
pub async fn next<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(ANSWER_WITHIN, ws.next())
        .await
        .expect("an answer in time")
        .expect("the socket is open")
        .expect("a well-formed message")
}

/// Sends `message` and checks that the same comes back.
pub async fn round_trip<S>(ws: &mut WebSocketStream<S>, message: Message)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(message.clone()).await.expect("sent");
    assert_eq!(next(ws).await, message);
}

/// Text, a small and a large binary message (the 64-bit length form), and a ping all
/// come back.
pub async fn echoes<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    round_trip(ws, Message::text("hello through ember")).await;
    let small: Vec<u8> = (0..=255).collect();
    round_trip(ws, Message::binary(small)).await;
    let large: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    round_trip(ws, Message::binary(large)).await;
    ws.send(Message::Ping("are you there".into()))
        .await
        .unwrap();
    assert_eq!(next(ws).await, Message::Pong("are you there".into()));
}

/// Round trips of a short text message, one after another: (p50, p99).
pub async fn latency<S>(ws: &mut WebSocketStream<S>, count: usize) -> (Duration, Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        round_trip(ws, Message::text(format!("ping {i}"))).await;
        took.push(started.elapsed());
    }
    took.sort();
    (took[count / 2], took[count * 99 / 100])
}

/// Waits up to `within` for the gateway to close the socket as a retired instance's:
/// a Close frame saying "going away", then the end of the stream, no error.
pub async fn closes_going_away(ws: &mut Socket, within: Duration) -> Duration {
    let started = Instant::now();
    let closing = async {
        let first = ws.next().await;
        match first {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected a Close frame (1001), got {other:?}"),
        }
        match ws.next().await {
            None | Some(Err(Error::ConnectionClosed)) => {}
            other => panic!("expected the end of the socket, got {other:?}"),
        }
    };
    tokio::time::timeout(within, closing)
        .await
        .expect("the socket is closed in time");
    started.elapsed()
}
