//! `/ws`: a WebSocket echo (RFC 6455), standard library only, for the gateway's
//! pass-through tests. The handshake answers 101 with `Sec-WebSocket-Accept` (SHA-1 and
//! base64 of the key and the protocol's GUID, both written out below); then every text,
//! binary or continuation frame comes back as it came (unmasked, same opcode and FIN), a
//! ping gets a pong with its payload, and a close gets a close with its status. A frame
//! the protocol forbids (unmasked, unknown opcode, too large) gets a close 1002 or 1009.
//!
//! The frame reader and writer, `close`, `sha1` and `base64` are public because
//! `functions/comfyui-stub` includes this file (`#[path]`) for its own sockets.

use std::io::{self, BufRead, Read, Write};

/// The GUID the accept key is hashed with (RFC 6455 section 1.3).
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest frame payload echoed; beyond it the socket is closed with 1009.
const MAX_PAYLOAD: u64 = 16 * 1024 * 1024;

/// Whether a request asks for this route's upgrade: `Upgrade: websocket` with a key.
pub fn wants_upgrade(upgrade: Option<&str>, key: Option<&str>) -> bool {
    upgrade.is_some_and(|u| u.eq_ignore_ascii_case("websocket")) && key.is_some()
}

/// Answers the handshake for `key`, then echoes frames until either side closes.
pub fn session<R: BufRead, W: Write>(key: &str, r: &mut R, w: &mut W) -> io::Result<()> {
    let accept = base64(&sha1(format!("{}{GUID}", key.trim()).as_bytes()));
    write!(
        w,
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    )?;
    w.flush()?;
    loop {
        let Some(frame) = read_frame(r)? else {
            return Ok(());
        };
        let (fin_opcode, payload) = match frame {
            Frame::Data { fin_opcode, payload } => (fin_opcode, payload),
            Frame::Refused(status) => return close(w, &status.to_be_bytes()),
        };
        match fin_opcode & 0x0f {
            0x0..=0x2 => write_frame(w, fin_opcode, &payload)?,
            0x8 => return close(w, &payload[..payload.len().min(2)]),
            0x9 => write_frame(w, 0x8a, &payload)?,
            0xa => {}
            _ => return close(w, &1002u16.to_be_bytes()),
        }
    }
}

/// One frame as read.
pub enum Frame {
    /// A frame we take: its first byte (FIN bit and opcode) and unmasked payload.
    Data { fin_opcode: u8, payload: Vec<u8> },
    /// A frame we will not take: close with this status.
    Refused(u16),
}

/// The next frame, unmasked; `None` at end of stream.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 2];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    // Clients must mask every frame (RFC 6455 section 5.1).
    if head[1] & 0x80 == 0 {
        return Ok(Some(Frame::Refused(1002)));
    }
    if len > MAX_PAYLOAD {
        return Ok(Some(Frame::Refused(1009)));
    }
    let mut mask = [0u8; 4];
    r.read_exact(&mut mask)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(Some(Frame::Data { fin_opcode: head[0], payload }))
}

/// Writes one unmasked frame: `fin_opcode` is the first byte (FIN bit and opcode).
pub fn write_frame<W: Write>(w: &mut W, fin_opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mut head = vec![fin_opcode];
    match payload.len() {
        n @ 0..=125 => head.push(n as u8),
        n @ 126..=0xffff => {
            head.push(126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            head.push(127);
            head.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// Sends a close frame with `status` (empty or two bytes) and ends the session.
pub fn close<W: Write>(w: &mut W, status: &[u8]) -> io::Result<()> {
    write_frame(w, 0x88, status)
}

/// SHA-1 (FIPS 180-4), as the handshake needs it; not for anything secret.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hi, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hi = hi.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

