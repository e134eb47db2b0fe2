//! The data folders (`input/`, `output/`, `temp/`) and the routes that read and write
//! them: `/view` downloads, `/upload/image` and `/upload/mask`. Paths from clients are
//! checked before any file is touched: nothing outside the three folders can be read or
//! written.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process;

use crate::api::Reply;
use crate::json::{self, quote, Json};
use crate::Request;

/// The three folders ComfyUI keeps images in, under one base.
pub struct Dirs {
    pub base: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub temp: PathBuf,
}

impl Dirs {
    /// Creates the folders under `DATA_DIR` (default `/comfy`, which a `FROM scratch`
    /// container can create in its writable root), else under `./comfy-data`; exits when
    /// neither can be written. `temp/` starts empty, as ComfyUI clears it at start.
    pub fn open() -> Dirs {
        let wanted = std::env::var("DATA_DIR").unwrap_or_else(|_| "/comfy".into());
        let mut tried = Vec::new();
        for base in [PathBuf::from(&wanted), PathBuf::from("comfy-data")] {
            match Dirs::create(&base) {
                Ok(dirs) => return dirs,
                Err(e) => tried.push(format!("{}: {e}", base.display())),
            }
        }
        eprintln!("comfyui-stub: no writable data folder ({})", tried.join("; "));
        process::exit(1);
    }

    fn create(base: &Path) -> io::Result<Dirs> {
        fs::create_dir_all(base)?;
        let base = fs::canonicalize(base)?;
        let dirs = Dirs { input: base.join("input"), output: base.join("output"), temp: base.join("temp"), base };
        match fs::remove_dir_all(&dirs.temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for dir in [&dirs.input, &dirs.output, &dirs.temp] {
            fs::create_dir_all(dir)?;
        }
        let probe = dirs.temp.join(".probe");
        fs::write(&probe, b"")?;
        fs::remove_file(probe)?;
        Ok(dirs)
    }

    /// The folder of a ComfyUI "type": `input`, `output` or `temp`.
    pub fn by_type(&self, kind: &str) -> Option<&Path> {
        match kind {
            "input" => Some(&self.input),
            "output" => Some(&self.output),
            "temp" => Some(&self.temp),
            _ => None,
        }
    }

    /// The file an annotated name (`name.png [output]`, default folder `input`) points
    /// at, if it names a file inside the folders (LoadImage's check).
    pub fn annotated_file(&self, name: &str) -> Option<PathBuf> {
        let (name, dir) = self.annotated(name);
        let relative = normalize(name)?;
        let path = dir.unwrap_or(&self.input).join(relative);
        path.is_file().then_some(path)
    }

    /// ComfyUI's `annotated_filepath`: a ` [output]`, ` [input]` or ` [temp]` suffix
    /// names the folder.
    fn annotated<'a>(&self, name: &'a str) -> (&'a str, Option<&Path>) {
        for kind in ["output", "input", "temp"] {
            if let Some(stem) = name.strip_suffix(&format!(" [{kind}]")) {
                return (stem, self.by_type(kind));
            }
        }
        (name, None)
    }

    /// Image files directly in `input/`, sorted (LoadImage's choices).
    pub fn input_images(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.input)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| content_type(n).starts_with("image/"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// A relative path with `.` and `..` resolved; `None` when it is absolute or climbs out.
pub fn normalize(path: &str) -> Option<PathBuf> {
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.iter().collect())
}

/// The content type for a file name, by its extension, as Python's `mimetypes` guesses;
/// pages and scripts are sent as downloads, as ComfyUI does.
pub fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

/// `GET /view?filename=&subfolder=&type=`: a file from one of the folders. As ComfyUI:
/// 404 without a filename, 400 for an empty or climbing filename or an unknown type, 403
/// for a subfolder outside the folder, 404 for a missing file.
pub fn view(dirs: &Dirs, query: &[(String, String)]) -> Reply {
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(filename) = param("filename") else { return Reply::empty(404) };
    let (filename, annotated_dir) = dirs.annotated(filename);
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return Reply::empty(400);
    }
    let dir = match annotated_dir {
        Some(dir) => dir,
        None => match dirs.by_type(param("type").unwrap_or("output")) {
            Some(dir) => dir,
            None => return Reply::empty(400),
        },
    };
    let mut folder = dir.to_path_buf();
    if let Some(subfolder) = param("subfolder") {
        match normalize(subfolder) {
            Some(relative) => folder.push(relative),
            None => return Reply::empty(403),
        }
    }
    let name = filename.rsplit('/').next().unwrap_or(filename);
    let path = folder.join(name);
    if !path.is_file() {
        return Reply::empty(404);
    }
    match fs::read(&path) {
        Ok(bytes) => Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), content_type(name).into()),
                ("content-disposition".into(), format!("filename=\"{}\"", name.replace(['"', '\r', '\n'], "_"))),
            ],
            body: bytes,
        },
        Err(_) => Reply::empty(404),
    }
}

/// `POST /upload/image` and `POST /upload/mask`: saves the `image` part under
/// `TYPE/SUBFOLDER/NAME` (type `input` unless `type` says `temp` or `output`). Without
/// `overwrite`, a name taken by different bytes becomes `NAME (1).EXT`, `NAME (2).EXT`…,
/// and a name taken by the same bytes is reused. The answer is `{name, subfolder, type}`.
///
/// For a mask, ComfyUI pastes the mask into the alpha channel of the image `original_ref`
/// names; the stub checks that `original_ref` is a JSON object with a `filename` and then
/// saves the mask part as it came, without compositing.
pub fn upload(dirs: &Dirs, req: &Request, mask: bool) -> Reply {
    let Some(parts) = req.header("content-type").and_then(boundary).and_then(|b| multipart(&req.body, &b)) else {
        return Reply::text(400, "expected a multipart/form-data body");
    };
    let field = |name: &str| {
        parts.iter().find(|p| p.name == name).map(|p| String::from_utf8_lossy(&p.data).into_owned())
    };
    let Some(image) = parts.iter().find(|p| p.name == "image" && p.filename.is_some()) else {
        return Reply::text(400, "no `image` file part");
    };
    let filename = image.filename.clone().unwrap_or_default();
    if filename.is_empty() {
        return Reply::text(400, "the `image` part has no filename");
    }
    if filename.chars().any(char::is_control) {
        return Reply::text(400, "the filename has control characters");
    }
    if mask {
        let original = field("original_ref").and_then(|r| json::parse(r.as_bytes()).ok());
        if original.as_ref().and_then(|o| o.get("filename")).and_then(Json::as_str).is_none() {
            return Reply::text(400, "`original_ref` must be a JSON object with a `filename`");
        }
    }
    let kind = field("type").unwrap_or_else(|| "input".into());
    let Some(dir) = dirs.by_type(&kind) else {
        return Reply::text(400, "`type` must be input, temp or output");
    };
    let subfolder = field("subfolder").unwrap_or_default();
    // ComfyUI answers 400 (not 403) when an upload would land outside its folder.
    let (Some(relative), false) = (normalize(&subfolder), filename.contains(['/', '\\']) || filename == "." || filename == "..") else {
        return Reply::text(400, "the file would land outside the folder");
    };
    let folder = dir.join(relative);
    if fs::create_dir_all(&folder).is_err() {
        return Reply::text(500, "cannot create the folder");
    }
    let overwrite = matches!(field("overwrite").as_deref(), Some("true" | "1"));
    let (stem, ext) = split_ext(&filename);
    let mut name = filename.clone();
    let mut duplicate = false;
    let mut i = 1;
    while !overwrite && folder.join(&name).exists() {
        if fs::read(folder.join(&name)).is_ok_and(|old| old == image.data) {
            duplicate = true;
            break;
        }
        name = format!("{stem} ({i}){ext}");
        i += 1;
    }
    if !duplicate && fs::write(folder.join(&name), &image.data).is_err() {
        return Reply::text(500, "cannot write the file");
    }
    let body = format!(r#"{{"name":{},"subfolder":{},"type":{}}}"#, quote(&name), quote(&subfolder), quote(&kind));
    Reply::json(200, body)
}

/// Python's `os.path.splitext`: the extension with its dot; a leading dot is no extension.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if name[..i].chars().any(|c| c != '.') => (&name[..i], &name[i..]),
        _ => (name, ""),
    }
}

/// One part of a multipart/form-data body.
struct Part {
    name: String,
    filename: Option<String>,
    data: Vec<u8>,
}

/// The boundary of a `multipart/form-data; boundary=...` content type.
fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
    })
    .filter(|b| !b.is_empty())
}

/// The parts of a multipart body (RFC 7578); `None` when it is malformed.
fn multipart(body: &[u8], boundary: &str) -> Option<Vec<Part>> {
    let delimiter = format!("--{boundary}").into_bytes();
    let mut at = find(body, &delimiter, 0)? + delimiter.len();
    let mut parts = Vec::new();
    loop {
        if body[at..].starts_with(b"--") {
            return Some(parts);
        }
        at += 2; // the CRLF after the delimiter
        let head_end = find(body, b"\r\n\r\n", at)?;
        let head = String::from_utf8_lossy(body.get(at..head_end)?).into_owned();
        let data_start = head_end + 4;
        let mut end_marker = b"\r\n".to_vec();
        end_marker.extend_from_slice(&delimiter);
        let data_end = find(body, &end_marker, data_start)?;
        let (mut name, mut filename) = (None, None);
        for line in head.split("\r\n") {
            let Some((key, value)) = line.split_once(':') else { continue };
            if key.trim().eq_ignore_ascii_case("content-disposition") {
                for (k, v) in disposition_params(value) {
                    match k.as_str() {
                        "name" => name = Some(v),
                        "filename" => filename = Some(v),
                        _ => {}
                    }
                }
            }
        }
        parts.push(Part { name: name.unwrap_or_default(), filename, data: body[data_start..data_end].to_vec() });
        at = data_end + end_marker.len();
    }
}

/// The `key=value` parameters of a Content-Disposition value, quotes removed.
fn disposition_params(value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(semi) = rest.find(';') {
        rest = &rest[semi + 1..];
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_ascii_lowercase();
        let after = rest[eq + 1..].trim_start();
        let (val, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => val.push(c),
                }
            }
            (val, &quoted[end..])
        } else {
            let end = after.find(';').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.push((key, val));
        rest = next;
    }
    out
}

/// Where `needle` first occurs in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..].windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

/// The query string of a target as decoded pairs (`%XX` and `+` decoded).
pub fn query(target: &str) -> Vec<(String, String)> {
    let Some((_, query)) = target.split_once('?') else { return Vec::new() };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as a space when `plus`); bad escapes stay as they are.
pub fn percent_decode(s: &str, plus: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
