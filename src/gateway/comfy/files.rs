//! `GET /view` and `POST /upload/image` / `/upload/mask`: files the gateway keeps, so they
//! outlive the instances that made or used them.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart};
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::query_map;
use crate::activator::Function;
use crate::comfy::{NameError, Owner, UploadError};
use crate::gateway::error::ApiError;
use crate::gateway::AppState;

/// How long a read of a running prompt's file from its instance may take.
const VIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// ComfyUI's folder types.
const KINDS: [&str; 3] = ["input", "output", "temp"];

/// A plain-text refusal, as ComfyUI words its file errors.
fn refuse(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

fn name_refusal(e: NameError) -> Response {
    match e {
        NameError::Bad(m) => refuse(StatusCode::BAD_REQUEST, m),
        NameError::Escapes(m) => refuse(StatusCode::FORBIDDEN, m),
    }
}

/// The content type of a file, by its extension; scripts and pages are never served as
/// such (ComfyUI forces them to octet-stream too).
fn content_type(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        Some("flac") => "audio/flac",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// `GET /view?filename=&subfolder=&type=`: the gateway's copy; else a running prompt's
/// instance (a preview in `temp` while it runs).
pub async fn view(
    state: &AppState,
    f: &Arc<Function>,
    caller: &Owner,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let query = query_map(req.uri());
    let filename = query.get("filename").map_or("", String::as_str);
    let subfolder = query.get("subfolder").map_or("", String::as_str);
    let kind = query.get("type").map_or("output", String::as_str);
    if !KINDS.contains(&kind) {
        let message = format!("`type` must be input, output or temp, not `{kind}`");
        return Ok(refuse(StatusCode::BAD_REQUEST, message));
    }
    if let Err(e) = crate::comfy::check_name(subfolder, filename) {
        return Ok(name_refusal(e));
    }
    if let Some(bytes) = state
        .comfy
        .file(f.name(), caller, kind, subfolder, filename)
        .await?
    {
        let disposition = format!("filename=\"{}\"", filename.replace('"', "%22"));
        return Ok((
            [
                (header::CONTENT_TYPE, content_type(filename).to_string()),
                (header::CONTENT_DISPOSITION, disposition),
            ],
            bytes,
        )
            .into_response());
    }
    if let Some((permit, original)) = state.comfy.running_source(f.name(), caller, subfolder) {
        // Read whole, so the prompt's instance is not held by a slow reader.
        let query = format!(
            "/view?filename={}&subfolder={}&type={}",
            crate::comfy::encode(filename),
            crate::comfy::encode(&original),
            crate::comfy::encode(kind)
        );
        let req = Request::get(query)
            .body(Body::empty())
            .expect("a path makes a request");
        let limit = crate::comfy::MAX_OUTPUT_FILE;
        let fetched = state
            .invoker
            .proxy()
            .fetch(&permit, req, VIEW_TIMEOUT, limit)
            .await;
        drop(permit);
        if let Ok((status, headers, bytes)) = fetched {
            if status.is_success() {
                let mut response = bytes.into_response();
                for name in [header::CONTENT_TYPE, header::CONTENT_DISPOSITION] {
                    if let Some(v) = headers.get(&name) {
                        response.headers_mut().insert(name, v.clone());
                    }
                }
                return Ok(response);
            }
        }
    }
    Ok(refuse(
        StatusCode::NOT_FOUND,
        format!("no file `{filename}` in {kind}/{subfolder}"),
    ))
}

/// `POST /upload/image` and `/upload/mask`: multipart `image` (the file), `type`,
/// `subfolder`, `overwrite`. The gateway keeps the file and places it on whichever
/// instance runs a prompt naming it. A mask is kept as sent (ComfyUI would copy its
/// alpha onto `original_ref`'s image).
pub async fn upload(
    state: &AppState,
    f: &Arc<Function>,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let limit = f.revision().manifest.request.max_body.as_u64() as usize;
    let mut form = match Multipart::from_request(req, state).await {
        Ok(form) => form,
        Err(e) => {
            return Ok(refuse(
                StatusCode::BAD_REQUEST,
                format!("the upload is not a multipart form: {e}"),
            ))
        }
    };
    let (mut file, mut kind, mut subfolder, mut overwrite) =
        (None, "input".to_string(), String::new(), false);
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return Ok(refuse(
                    StatusCode::BAD_REQUEST,
                    format!("the upload's form is malformed: {e}"),
                ))
            }
        };
        let name = field.name().unwrap_or("").to_string();
        let filename = field.file_name().map(str::to_string);
        let mut bytes = Vec::new();
        let mut field = field;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > limit {
                        return Err(crate::proxy::ProxyError::BodyTooLarge {
                            limit: limit as u64,
                        }
                        .into());
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Ok(refuse(
                        StatusCode::BAD_REQUEST,
                        format!("the upload's form is malformed: {e}"),
                    ))
                }
            }
        }
        let text = || String::from_utf8_lossy(&bytes).trim().to_string();
        match name.as_str() {
            "image" => file = Some((filename, bytes::Bytes::from(bytes))),
            "type" => kind = text(),
            "subfolder" => subfolder = text(),
            "overwrite" => overwrite = matches!(text().as_str(), "true" | "1"),
            _ => {}
        }
    }
    let Some((filename, bytes)) = file else {
        return Ok(refuse(
            StatusCode::BAD_REQUEST,
            "the form has no `image` file part".into(),
        ));
    };
    let Some(filename) = filename.filter(|n| !n.is_empty()) else {
        return Ok(refuse(
            StatusCode::BAD_REQUEST,
            "the `image` part has no filename".into(),
        ));
    };
    if kind.is_empty() {
        kind = "input".into();
    }
    if !KINDS.contains(&kind.as_str()) {
        return Ok(refuse(
            StatusCode::BAD_REQUEST,
            format!("`type` must be input, output or temp, not `{kind}`"),
        ));
    }
    match state
        .comfy
        .upload(f.name(), &kind, &subfolder, &filename, bytes, overwrite)
        .await
    {
        Ok(answer) => Ok(Json(answer).into_response()),
        Err(UploadError::Name(e)) => Ok(name_refusal(e)),
        Err(UploadError::Store(e)) => Err(e.into()),
        Err(UploadError::Io(e)) => Err(ApiError::Files(e)),
    }
}
