//! The web UI: every file under manager/ui/ embedded in the binary at build time, so
//! the manager needs nothing on disk to serve it (no Node.js at run time).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use include_dir::{include_dir, Dir};

static UI: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/ui");

pub fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The embedded file at `path` (`/` is index.html), if there is one.
pub fn serve(path: &str) -> Option<Response> {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() || rel.ends_with('/') { format!("{rel}index.html") } else { rel.to_string() };
    if rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return None;
    }
    let f = UI.get_file(&rel)?;
    Some(
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, content_type(&rel)), (header::CACHE_CONTROL, "no-cache")],
            f.contents(),
        )
            .into_response(),
    )
}
