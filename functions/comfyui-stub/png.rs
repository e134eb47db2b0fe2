//! PNG images without a compression library: 8-bit RGB, each row unfiltered, the image
//! data in a zlib stream of stored (uncompressed) deflate blocks, with the CRC-32 of
//! every chunk and the Adler-32 of the data written out here. Any PNG reader takes them.
//! Also the pictures the stub "generates": soft blobs of colour with fine grain, the same
//! for the same seed.

use crate::mix64;

/// The PNG file signature.
pub const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
/// Largest payload of one stored deflate block.
const STORED_MAX: usize = 65_535;

/// A PNG of `width` × `height` RGB pixels (`rgb` row by row, 3 bytes a pixel), with
/// `tEXt` chunks for `text` (keyword, Latin-1 text) before the image data.
pub fn encode(width: u32, height: u32, rgb: &[u8], text: &[(&str, &str)]) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &header);
    for (keyword, value) in text {
        let mut data = keyword.as_bytes().to_vec();
        data.push(0);
        data.extend_from_slice(value.as_bytes());
        chunk(&mut out, b"tEXt", &data);
    }
    let row = width as usize * 3;
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in rgb.chunks(row.max(1)).take(height as usize) {
        raw.push(0); // filter type None
        raw.extend_from_slice(line);
    }
    chunk(&mut out, b"IDAT", &zlib_stored(&raw));
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The width and height in a PNG's header, if `bytes` starts like a PNG.
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.get(..8)? != SIGNATURE || bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let word = |at: usize| Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    Some((word(16)?, word(20)?))
}

/// Appends one chunk: length, type, data, CRC-32 of type and data.
fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream (RFC 1950) holding `data` in stored deflate blocks (RFC 1951 3.2.4).
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    // CMF 0x78: deflate with a 32 KiB window; FLG 0x01 makes CMF·256+FLG a multiple of 31.
    let mut out = vec![0x78, 0x01];
    let mut blocks = data.chunks(STORED_MAX).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        let last = blocks.peek().is_none();
        out.push(u8::from(last)); // BFINAL, and BTYPE 00 (stored)
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// The CRC-32 table (polynomial 0xEDB88320, reflected), built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

/// CRC-32 as PNG (and zlib's `crc32`) computes it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    c ^ 0xffff_ffff
}

/// Adler-32 (RFC 1950), the zlib stream's checksum.
pub fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that can be summed before the u32s could overflow.
    for block in data.chunks(5552) {
        for &byte in block {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// Size of the colour blobs, in pixels.
const CELL: u32 = 16;

/// The "generated" picture for `seed` at `width` × `height`, as RGB bytes: a grid of
/// random colours blended smoothly, with a little per-pixel grain.
pub fn picture(seed: u64, width: u32, height: u32) -> Vec<u8> {
    let corner = |cx: u32, cy: u32, c: u32| -> f32 {
        let h = mix64(seed ^ mix64((u64::from(cx) << 40) | (u64::from(cy) << 20) | u64::from(c)));
        (h & 0xff) as f32
    };
    let mut rgb = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let (cx, cy) = (x / CELL, y / CELL);
            let (fx, fy) = ((x % CELL) as f32 / CELL as f32, (y % CELL) as f32 / CELL as f32);
            for c in 0..3 {
                let top = corner(cx, cy, c) * (1.0 - fx) + corner(cx + 1, cy, c) * fx;
                let bottom = corner(cx, cy + 1, c) * (1.0 - fx) + corner(cx + 1, cy + 1, c) * fx;
                let grain = (mix64(seed ^ (u64::from(y) << 32 | u64::from(x) << 2 | u64::from(c))) & 0x1f) as f32 - 16.0;
                rgb.push((top * (1.0 - fy) + bottom * fy + grain).clamp(0.0, 255.0) as u8);
            }
        }
    }
    rgb
}

/// A sampling preview: `picture(seed)` at `step` of `steps`, fading in from noise.
pub fn preview(seed: u64, width: u32, height: u32, step: u32, steps: u32) -> Vec<u8> {
    let done = step as f32 / steps.max(1) as f32;
    let target = picture(seed, width, height);
    let noise_seed = mix64(seed ^ u64::from(step));
    target
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let noise = (mix64(noise_seed ^ i as u64) & 0xff) as f32;
            (f32::from(t) * done + noise * (1.0 - done)) as u8
        })
        .collect()
}
