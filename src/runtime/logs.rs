//! A container's output in Ember's terms: what to read of it (`LogOptions`), the chunks an
//! engine hands back tagged by stream (`LogChunk`), and the same cut into lines
//! (`LogLine`, `into_lines`), which is what nodes pass on and the gateway prefixes.
//! `keep_last` bounds what is kept of an instance's output once it is gone.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::RuntimeError;

/// Longest line passed on whole; a longer one is cut into pieces of this size, so that
/// a program writing without newlines cannot make a reader hold unbounded memory.
pub const MAX_LINE_BYTES: usize = 16 << 10;

/// Which of a container's streams some output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output (and a TTY's output).
    Stdout,
    /// Standard error.
    Stderr,
}

/// What to read of a container's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogOptions {
    /// Keep reading what it writes, until it stops or the reader lets go.
    #[serde(default)]
    pub follow: bool,
    /// Only output written at or after this time (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Only the last lines of what is there already; `None`: all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
    /// Start each line with the engine's RFC 3339 time of it.
    #[serde(default)]
    pub timestamps: bool,
}

/// Some output of one stream, as the engine hands it over (not cut at lines).
#[derive(Debug, Clone, PartialEq)]
pub struct LogChunk {
    /// Where it came from.
    pub stream: OutputStream,
    /// The bytes.
    pub data: Bytes,
}

/// A container's output as the engine hands it over.
pub type LogStream = BoxStream<'static, Result<LogChunk, RuntimeError>>;

/// One line of a container's output, without its newline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Where it came from.
    pub stream: OutputStream,
    /// The text (invalid UTF-8 replaced).
    pub line: String,
}

/// A container's output, line by line.
pub type LineStream<E> = BoxStream<'static, Result<LogLine, E>>;

/// Cuts `chunks` into lines, stdout and stderr apart (a line may arrive in pieces, and
/// one chunk may hold many lines); a last line without a newline is passed on at the end.
/// An error ends the lines after it is passed on.
pub fn into_lines(chunks: LogStream) -> LineStream<RuntimeError> {
    let state = (chunks, Splitter::default(), VecDeque::new(), false);
    futures_util::stream::unfold(
        state,
        |(mut chunks, mut split, mut ready, mut done)| async move {
            loop {
                if let Some(item) = ready.pop_front() {
                    return Some((item, (chunks, split, ready, done)));
                }
                if done {
                    return None;
                }
                match chunks.next().await {
                    Some(Ok(chunk)) => ready.extend(split.push(chunk).into_iter().map(Ok)),
                    Some(Err(e)) => {
                        ready.extend(split.finish().into_iter().map(Ok));
                        ready.push_back(Err(e));
                        done = true;
                    }
                    None => {
                        ready.extend(split.finish().into_iter().map(Ok));
                        done = true;
                    }
                }
            }
        },
    )
    .boxed()
}

/// The unfinished line of each stream.
#[derive(Default)]
struct Splitter {
    stdout: BytesMut,
    stderr: BytesMut,
}

impl Splitter {
    fn pending(&mut self, stream: OutputStream) -> &mut BytesMut {
        match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        }
    }

    /// The lines `chunk` completes.
    fn push(&mut self, chunk: LogChunk) -> Vec<LogLine> {
        let pending = self.pending(chunk.stream);
        pending.extend_from_slice(&chunk.data);
        let mut lines = Vec::new();
        loop {
            let cut = match pending.iter().position(|&b| b == b'\n') {
                Some(end) if end <= MAX_LINE_BYTES => end + 1,
                _ if pending.len() > MAX_LINE_BYTES => MAX_LINE_BYTES,
                _ => break,
            };
            let raw = pending.split_to(cut);
            lines.push(line(chunk.stream, &raw));
        }
        lines
    }

    /// What is left of both streams.
    fn finish(&mut self) -> Vec<LogLine> {
        [OutputStream::Stdout, OutputStream::Stderr]
            .into_iter()
            .filter_map(|s| {
                let rest = self.pending(s).split();
                (!rest.is_empty()).then(|| line(s, &rest))
            })
            .collect()
    }
}

fn line(stream: OutputStream, raw: &[u8]) -> LogLine {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    LogLine {
        stream,
        line: String::from_utf8_lossy(raw).into_owned(),
    }
}

/// The last lines of `lines` that fit in `max_bytes` (a line counts its text and its
/// newline). When even the last line alone is too long, its end is kept, cut at a
/// character boundary.
pub fn keep_last(lines: impl IntoIterator<Item = LogLine>, max_bytes: usize) -> Vec<LogLine> {
    let mut kept = VecDeque::new();
    let mut bytes = 0;
    for l in lines {
        bytes += l.line.len() + 1;
        kept.push_back(l);
        while bytes > max_bytes && kept.len() > 1 {
            let first = kept.pop_front().expect("more than one");
            bytes -= first.line.len() + 1;
        }
    }
    if bytes > max_bytes {
        if let Some(only) = kept.front_mut() {
            let mut start = only.line.len() + 1 - max_bytes.max(1);
            while !only.line.is_char_boundary(start) {
                start += 1;
            }
            only.line.drain(..start);
        }
    }
    kept.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: OutputStream, data: &str) -> Result<LogChunk, RuntimeError> {
        Ok(LogChunk {
            stream,
            data: Bytes::copy_from_slice(data.as_bytes()),
        })
    }

    fn out(line: &str) -> LogLine {
        LogLine {
            stream: OutputStream::Stdout,
            line: line.into(),
        }
    }

    #[tokio::test]
    async fn chunks_become_lines_per_stream_whatever_their_cuts() {
        use OutputStream::{Stderr, Stdout};
        let chunks = futures_util::stream::iter(vec![
            chunk(Stdout, "one\ntw"),
            chunk(Stderr, "oops\r\n"),
            chunk(Stdout, "o\nthree"),
        ])
        .boxed();
        let lines: Vec<LogLine> = into_lines(chunks)
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
            .await;
        let got: Vec<(OutputStream, &str)> =
            lines.iter().map(|l| (l.stream, l.line.as_str())).collect();
        assert_eq!(
            got,
            [
                (Stdout, "one"),
                (Stderr, "oops"),
                (Stdout, "two"),
                (Stdout, "three")
            ]
        );
    }

    #[tokio::test]
    async fn a_line_without_newlines_is_cut_at_the_line_limit() {
        let long = "x".repeat(MAX_LINE_BYTES * 2 + 5);
        let chunks = futures_util::stream::iter(vec![chunk(OutputStream::Stdout, &long)]).boxed();
        let lens: Vec<usize> = into_lines(chunks)
            .map(|l| l.unwrap().line.len())
            .collect()
            .await;
        assert_eq!(lens, [MAX_LINE_BYTES, MAX_LINE_BYTES, 5]);
    }

    #[test]
    fn keeping_the_last_bytes_drops_whole_lines_from_the_front() {
        let lines = ["aaaa", "bbbb", "cccc"].map(out);
        // Each line is 5 bytes with its newline: 10 bytes keep the last two.
        assert_eq!(keep_last(lines.clone(), 10), [out("bbbb"), out("cccc")]);
        assert_eq!(keep_last(lines.clone(), 14), [out("bbbb"), out("cccc")]);
        assert_eq!(keep_last(lines, 15).len(), 3);
    }

    #[test]
    fn a_last_line_longer_than_the_limit_keeps_its_end_at_a_character_boundary() {
        // "é" is two bytes: a cut in its middle moves past it.
        let kept = keep_last([out("ab"), out("xéyz")], 4);
        assert_eq!(kept, [out("yz")]);
        let kept = keep_last([out("xéyz")], 5);
        assert_eq!(kept, [out("éyz")]);
    }
}
