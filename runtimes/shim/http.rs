//! Just enough HTTP/1.1 for a function behind Ember's gateway: request heads, bodies by
//! `Content-Length` or chunked, and responses either whole or chunked as they are made.
//! It knows nothing of commands; `main.rs` decides what to answer.

use std::io::{self, BufRead, Read, Write};

/// Cap on the request line plus headers; more answers 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// Cap on one chunk-size line of a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// A request's head. Header names keep their case; lookups ignore it.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub method: String,
    /// The path, without the query, as sent (still percent-encoded).
    pub path: String,
    /// What follows `?`, without it; empty when there is none.
    pub query: String,
    pub http10: bool,
    pub headers: Vec<(String, String)>,
}

/// Why a request could not be read.
#[derive(Debug, PartialEq)]
pub enum Error {
    /// The peer went away (or the socket failed): nobody to answer.
    Gone,
    /// Malformed; the text says what was wrong.
    Bad(&'static str),
    HeadTooLarge,
    BodyTooLarge,
}

impl Error {
    /// The status to answer with, when there is someone to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Gone => None,
            Error::Bad(_) => Some(400),
            Error::HeadTooLarge => Some(431),
            Error::BodyTooLarge => Some(413),
        }
    }
}

impl From<io::Error> for Error {
    fn from(_: io::Error) -> Self {
        Error::Gone
    }
}

impl Head {
    /// Every value of header `name`, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the client wants the connection kept after this exchange.
    pub fn keep_alive(&self) -> bool {
        if self.http10 {
            self.has_token("connection", "keep-alive")
        } else {
            !self.has_token("connection", "close")
        }
    }

    /// Whether the client waits for `100 Continue` before sending its body.
    pub fn expects_continue(&self) -> bool {
        !self.http10 && self.has_token("expect", "100-continue")
    }

    /// The body's announced length; `None` for a chunked body.
    pub fn content_length(&self) -> Result<Option<u64>, Error> {
        if self.values("transfer-encoding").next().is_some() {
            // Only chunked is understood, and it must be the last coding.
            let last = self
                .values("transfer-encoding")
                .flat_map(|v| v.split(','))
                .last();
            return match last.map(str::trim) {
                Some(t) if t.eq_ignore_ascii_case("chunked") => Ok(None),
                _ => Err(Error::Bad("unsupported transfer-encoding")),
            };
        }
        let mut length = None;
        for v in self.values("content-length") {
            let n = v
                .trim()
                .parse::<u64>()
                .map_err(|_| Error::Bad("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Bad("conflicting content-length"));
            }
            length = Some(n);
        }
        Ok(Some(length.unwrap_or(0)))
    }
}

/// Reads one line ending in `\n` (the `\r` too is dropped), charging it to `budget`.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize, too_long: Error) -> Result<String, Error> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64)
        .read_until(b'\n', &mut line)?;
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(if *budget == 0 { too_long } else { Error::Gone });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| Error::Bad("not UTF-8"))
}

/// Reads a request head; `Ok(None)` when the peer closed the connection between requests.
pub fn read_head<R: BufRead>(r: &mut R) -> Result<Option<Head>, Error> {
    if r.fill_buf()?.is_empty() {
        return Ok(None);
    }
    let mut budget = MAX_HEAD;
    let mut line = read_line(r, &mut budget, Error::HeadTooLarge)?;
    // A stray empty line between requests is allowed (RFC 9112, section 2.2).
    if line.is_empty() {
        line = read_line(r, &mut budget, Error::HeadTooLarge)?;
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::Bad("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(is_token) {
        return Err(Error::Bad("malformed method"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(Error::Bad("only HTTP/1.0 and HTTP/1.1 are served")),
    };
    if !target.starts_with('/') {
        return Err(Error::Bad("the target must be a path"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget, Error::HeadTooLarge)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(Error::Bad("header line without a colon"));
        };
        if name.is_empty() || !name.bytes().all(is_token) {
            return Err(Error::Bad("malformed header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(Error::Bad("control character in a header value"));
        }
        headers.push((name.to_string(), value.to_string()));
    }
    Ok(Some(Head {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        http10,
        headers,
    }))
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads the whole body `head` announces, refusing more than `max` bytes.
pub fn read_body<R: BufRead>(r: &mut R, head: &Head, max: u64) -> Result<Vec<u8>, Error> {
    let mut body = Vec::new();
    match head.content_length()? {
        Some(n) if n > max => return Err(Error::BodyTooLarge),
        Some(n) => {
            r.by_ref().take(n).read_to_end(&mut body)?;
            if body.len() as u64 != n {
                return Err(Error::Gone);
            }
        }
        None => loop {
            let mut budget = MAX_CHUNK_LINE;
            let line = read_line(r, &mut budget, Error::Bad("chunk-size line too long"))?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| Error::Bad("bad chunk size"))?;
            if size == 0 {
                let mut budget = MAX_HEAD;
                while !read_line(r, &mut budget, Error::HeadTooLarge)?.is_empty() {}
                break;
            }
            if body.len() as u64 + size > max {
                return Err(Error::BodyTooLarge);
            }
            let before = body.len();
            r.by_ref().take(size).read_to_end(&mut body)?;
            if (body.len() - before) as u64 != size {
                return Err(Error::Gone);
            }
            let mut budget = 2;
            if !read_line(r, &mut budget, Error::Bad("chunk not followed by CRLF"))?.is_empty() {
                return Err(Error::Bad("chunk not followed by CRLF"));
            }
        },
    }
    Ok(body)
}

/// The reason phrase of the statuses the shim sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn status_and_headers(status: u16, headers: &[(&str, &str)], close: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        out.push_str("connection: close\r\n");
    }
    out.into_bytes()
}

/// Writes a whole response; `head_only` (a HEAD request) leaves the body out but keeps its length.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
    head_only: bool,
) -> io::Result<()> {
    let mut out = status_and_headers(status, headers, close);
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    if !head_only {
        out.extend_from_slice(body);
    }
    w.write_all(&out)?;
    w.flush()
}

/// A response whose body is sent as it is made: chunked to HTTP/1.1 clients, and to
/// HTTP/1.0 ones delimited by closing the connection.
pub struct Streaming<W: Write> {
    w: W,
    chunked: bool,
}

impl<W: Write> Streaming<W> {
    /// Sends the head of a 200 (an HTTP/1.0 client's connection then closes at the end).
    pub fn start(
        mut w: W,
        headers: &[(&str, &str)],
        close: bool,
        http10: bool,
    ) -> io::Result<Self> {
        let mut out = status_and_headers(200, headers, close || http10);
        if !http10 {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"\r\n");
        w.write_all(&out)?;
        w.flush()?;
        Ok(Streaming {
            w,
            chunked: !http10,
        })
    }

    /// Sends `data` at once, as one chunk.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.chunked {
            let mut out = format!("{:x}\r\n", data.len()).into_bytes();
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
            self.w.write_all(&out)?;
        } else {
            self.w.write_all(data)?;
        }
        self.w.flush()
    }

    /// Ends the body as complete. A stream that is dropped instead is cut: the client sees
    /// a body without its end, never a short body that looks whole.
    pub fn finish(mut self) -> io::Result<()> {
        if self.chunked {
            self.w.write_all(b"0\r\n\r\n")?;
        }
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Error> {
        read_head(&mut text.as_bytes())
    }

    #[test]
    fn a_head_splits_path_and_query_and_keeps_headers() {
        let h =
            head("POST /render/frame?scene=a&x=1 HTTP/1.1\r\nX-Scene: cube \r\nHost: f\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(
            (h.method.as_str(), h.path.as_str()),
            ("POST", "/render/frame")
        );
        assert_eq!(h.query, "scene=a&x=1");
        assert_eq!(h.values("x-scene").collect::<Vec<_>>(), ["cube"]);
        assert!(h.keep_alive());
    }

    #[test]
    fn malformed_heads_are_refused_with_a_reason() {
        assert_eq!(
            head("GET / HTTP/2\r\n\r\n"),
            Err(Error::Bad("only HTTP/1.0 and HTTP/1.1 are served"))
        );
        assert_eq!(
            head("GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(Error::Bad("the target must be a path"))
        );
        assert_eq!(
            head("GET / HTTP/1.1\r\nNoColon\r\n\r\n"),
            Err(Error::Bad("header line without a colon"))
        );
        let huge = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(head(&huge), Err(Error::HeadTooLarge));
        assert_eq!(head(""), Ok(None));
        assert_eq!(head("GET / HTTP/1.1\r\nHost"), Err(Error::Gone));
    }

    #[test]
    fn bodies_are_read_by_length_or_chunks_within_the_limit() {
        let text = "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello";
        let mut r = text.as_bytes();
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!(read_body(&mut r, &h, 5).unwrap(), b"hello");
        let text = "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nt: 1\r\n\r\nNEXT";
        let mut r = text.as_bytes();
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!(read_body(&mut r, &h, 5).unwrap(), b"hello");
        assert_eq!(r, b"NEXT", "the next request is left unread");
        let mut r = text.as_bytes();
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!(read_body(&mut r, &h, 4), Err(Error::BodyTooLarge));
        let h = head("POST / HTTP/1.1\r\ncontent-length: 9\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            read_body(&mut &b""[..], &h, 8),
            Err(Error::BodyTooLarge),
            "refused before reading"
        );
    }

    #[test]
    fn http10_keeps_the_connection_only_when_asked() {
        assert!(!head("GET / HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap()
            .keep_alive());
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap()
            .keep_alive());
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap()
            .keep_alive());
    }

    #[test]
    fn a_stream_is_chunked_and_ends_only_when_finished() {
        let mut out = Vec::new();
        let mut s =
            Streaming::start(&mut out, &[("content-type", "text/plain")], false, false).unwrap();
        s.send(b"frame 1\n").unwrap();
        s.finish().unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
        assert!(text.ends_with("8\r\nframe 1\n\r\n0\r\n\r\n"), "{text:?}");
    }
}
