//! Reading a request off the connection: the request line and headers (bounded), a
//! content-length or chunked body (bounded), and `Expect: 100-continue`.

use super::*;

/// One HTTP request, as read off the connection.
pub struct Request {
    pub method: String,
    pub target: String,
    pub http10: bool,
    /// Names are lower-cased so lookups are case-insensitive.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[allow(dead_code)] // each program that includes this file uses some of these
impl Request {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Comma-separated tokens of every header called `name`, trimmed.
    pub fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    /// Whether the connection stays open after the answer.
    pub fn keep_alive(&self) -> bool {
        let mut connection = self.tokens("connection");
        if self.http10 {
            connection.any(|t| t.eq_ignore_ascii_case("keep-alive"))
        } else {
            !connection.any(|t| t.eq_ignore_ascii_case("close"))
        }
    }
}

/// Why a request could not be read.
pub enum ReqError {
    /// The peer went away or the socket failed: there is nobody to answer.
    Io,
    /// Malformed, with what was wrong.
    Bad(&'static str),
    /// The head is over `MAX_HEAD`.
    HeadTooLarge,
    /// The body is over `MAX_BODY`.
    BodyTooLarge,
}

impl From<io::Error> for ReqError {
    fn from(_: io::Error) -> Self {
        ReqError::Io
    }
}

/// Reads the next request; `None` means the peer closed cleanly between requests.
/// `w` is only used to answer `Expect: 100-continue`.
pub(super) fn read_request<R: BufRead, W: Write>(r: &mut R, w: &mut W) -> Result<Option<Request>, ReqError> {
    let mut budget = MAX_HEAD;
    // Clients may send a stray CRLF after a body; RFC 9112 asks servers to skip it.
    let line = loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => {}
            Some(line) => break line,
        }
    };
    let line = String::from_utf8(line).map_err(|_| ReqError::Bad("request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if is_token(m.as_bytes()) && !t.is_empty() => (m, t, v),
        _ => return Err(ReqError::Bad("malformed request line")),
    };
    // The target is echoed back in a header, so it must not smuggle in control characters.
    if !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ReqError::Bad("invalid request target"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReqError::Bad("unsupported HTTP version")),
    };

    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget)?.ok_or(ReqError::Io)?;
        if line.is_empty() {
            break;
        }
        headers.push(parse_header(&line)?);
    }
    let mut req = Request {
        method: method.to_string(),
        target: target.to_string(),
        http10,
        headers,
        body: Vec::new(),
    };

    // Transfer-Encoding wins over Content-Length (RFC 9112 section 6.3).
    let codings: Vec<&str> = req.tokens("transfer-encoding").collect();
    let chunked = !codings.is_empty();
    if chunked && (codings.len() != 1 || !codings[0].eq_ignore_ascii_case("chunked")) {
        return Err(ReqError::Bad("unsupported transfer-encoding"));
    }
    let length = if chunked { None } else { content_length(&req)? };
    if length.is_some_and(|len| len > MAX_BODY) {
        return Err(ReqError::BodyTooLarge);
    }
    // Clients such as curl hold a large body back for a second unless told to go ahead;
    // we only say so once the body is known to be acceptable.
    if !http10 && req.tokens("expect").any(|t| t.eq_ignore_ascii_case("100-continue")) {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        w.flush()?;
    }
    if chunked {
        req.body = read_chunked(r)?;
    } else if let Some(len) = length {
        r.by_ref().take(len).read_to_end(&mut req.body)?;
        if req.body.len() as u64 != len {
            return Err(ReqError::Io);
        }
    }
    Ok(Some(req))
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

fn parse_header(line: &[u8]) -> Result<(String, String), ReqError> {
    let colon =
        line.iter().position(|&b| b == b':').ok_or(ReqError::Bad("header without colon"))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // A name with whitespace also rejects obsolete line folding, which we do not support.
    if !is_token(name) {
        return Err(ReqError::Bad("invalid header name"));
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(ReqError::Bad("control character in header value"));
    }
    let value = String::from_utf8_lossy(value).trim_matches([' ', '\t']).to_string();
    Ok((String::from_utf8_lossy(name).to_ascii_lowercase(), value))
}

fn content_length(req: &Request) -> Result<Option<u64>, ReqError> {
    let mut length = None;
    for value in req.tokens("content-length") {
        let parsed = Some(value)
            .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(ReqError::Bad("invalid content-length"))?;
        // Repeated identical lengths are tolerated; differing ones are a smuggling attempt.
        if length.is_some_and(|l| l != parsed) {
            return Err(ReqError::Bad("conflicting content-length"));
        }
        length = Some(parsed);
    }
    Ok(length)
}

fn read_chunked<R: BufRead>(r: &mut R) -> Result<Vec<u8>, ReqError> {
    let mut body = Vec::new();
    loop {
        let line = read_chunk_line(r, MAX_CHUNK_LINE)?;
        // Chunk extensions (";name=value") carry nothing we use.
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .ok()
            .map(|s| s.trim_matches([' ', '\t']))
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or(ReqError::Bad("invalid chunk size"))?;
        if size == 0 {
            break;
        }
        if size > MAX_BODY - body.len() as u64 {
            return Err(ReqError::BodyTooLarge);
        }
        let before = body.len();
        r.by_ref().take(size).read_to_end(&mut body)?;
        if (body.len() - before) as u64 != size {
            return Err(ReqError::Io);
        }
        if !read_chunk_line(r, 2)?.is_empty() {
            return Err(ReqError::Bad("chunk not followed by CRLF"));
        }
    }
    // Trailers are ignored, but must be consumed to find where the next request starts.
    let mut budget = MAX_HEAD;
    while !read_line(r, &mut budget)?.ok_or(ReqError::Io)?.is_empty() {}
    Ok(body)
}

/// A line of chunked framing: too long means malformed, not an oversized header (431).
fn read_chunk_line<R: BufRead>(r: &mut R, mut limit: usize) -> Result<Vec<u8>, ReqError> {
    match read_line(r, &mut limit) {
        Ok(line) => line.ok_or(ReqError::Io),
        Err(ReqError::HeadTooLarge) => Err(ReqError::Bad("malformed chunk framing")),
        Err(e) => Err(e),
    }
}

/// Reads one line without its CRLF (a bare LF is accepted too), charging its length to
/// `budget`. `None` means end of stream before the first byte.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<Option<Vec<u8>>, ReqError> {
    let mut line = Vec::new();
    // Going through take() bounds memory even when the peer never sends a newline.
    let n = r.by_ref().take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(ReqError::HeadTooLarge);
    }
    *budget -= n;
    if line.pop() != Some(b'\n') {
        return Err(ReqError::Io); // the stream ended mid-line
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}
