//! The `raw` mode: HTTP/1.1 moved by hand between one client connection and one upstream
//! connection, in one task, with `Content-Length` bodies only.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Error;

/// Headers a proxy does not pass on (RFC 9110, 7.6.1): the list Ember's proxy strips
/// (`proxy::HOP_BY_HOP`), less `upgrade` and `transfer-encoding`, which this mode refuses.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
];

/// Parses a message's head from the front of a buffer, writing it as passed on: the head's
/// length and the body's, or `None` while the head is incomplete.
type Head = fn(&[u8], &mut Vec<u8>) -> Result<Option<(usize, usize)>, Error>;

/// Serves `client` until it closes, over one connection to `upstream`.
pub async fn connection(mut client: TcpStream, upstream: SocketAddr) -> Result<(), Error> {
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (mut from_client, mut from_up) =
        (BytesMut::with_capacity(8192), BytesMut::with_capacity(8192));
    let mut out = Vec::with_capacity(8192);
    loop {
        let Some(len) = read_message(&mut client, &mut from_client, &mut out, request_head).await?
        else {
            return Ok(());
        };
        out.extend_from_slice(&from_client[..len]);
        from_client.advance(len);
        up.write_all(&out).await?;
        let Some(len) = read_message(&mut up, &mut from_up, &mut out, response_head).await? else {
            return Err("the upstream closed the connection".into());
        };
        out.extend_from_slice(&from_up[..len]);
        from_up.advance(len);
        client.write_all(&out).await?;
    }
}

/// Reads one message's head and body into `buf`; `out` gets the head as passed on, and the
/// body's length is returned (its bytes at the front of `buf`). `None`: closed between
/// messages.
async fn read_message(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    head: Head,
) -> Result<Option<usize>, Error> {
    out.clear();
    let (head_len, body_len) = loop {
        if let Some(parsed) = head(buf, out)? {
            break parsed;
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("closed inside a message".into())
            };
        }
    };
    buf.advance(head_len);
    while buf.len() < body_len {
        if stream.read_buf(buf).await? == 0 {
            return Err("closed inside a body".into());
        }
    }
    Ok(Some(body_len))
}

/// A request's head (`Head`).
fn request_head(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<(usize, usize)>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = req.parse(buf)? else {
        return Ok(None);
    };
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    Ok(Some((len, pass_headers(req.headers, out)?)))
}

/// An answer's head (`Head`).
fn response_head(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<(usize, usize)>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = res.parse(buf)? else {
        return Ok(None);
    };
    let code = res.code.unwrap_or(502);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(Some((len, pass_headers(res.headers, out)?)))
}

/// Writes the end-to-end headers to `out`; the body's length.
fn pass_headers(headers: &[httparse::Header<'_>], out: &mut Vec<u8>) -> Result<usize, Error> {
    let mut body = 0;
    for h in headers {
        if HOP_BY_HOP.iter().any(|n| h.name.eq_ignore_ascii_case(n)) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("upgrade")
        {
            return Err(format!("{} is not handled by the raw mode", h.name).into());
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            body = std::str::from_utf8(h.value)?.trim().parse()?;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(body)
}
