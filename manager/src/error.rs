//! API errors: `{"type":"error","status":N,"code":"...","message":"...","field":"..."}`
//! with the HTTP status the contract (manager/API.md) names for each kind.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), field: None }
    }
    /// 400, naming the field at fault.
    pub fn bad(field: &str, message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), field: Some(field.to_string()) }
    }
    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("{}: not found", what.into()))
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }
    /// A failure of the host (I/O): the only 500.
    pub fn internal(e: anyhow::Error) -> ApiError {
        tracing::error!("{e:#}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
    /// The engine did not answer.
    pub fn engine(volume: &str, e: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, format!("volume {volume:?}: the engine did not answer: {e}"))
    }
    pub fn with_field(mut self, f: &str) -> ApiError {
        self.field = Some(f.to_string());
        self
    }
}

pub fn code(s: StatusCode) -> &'static str {
    match s.as_u16() {
        400 => "InvalidInput",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        413 => "RequestTooLarge",
        415 => "UnsupportedMediaType",
        502 => "EngineUnavailable",
        _ => "ServerError",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "error", "status": self.status.as_u16(), "code": code(self.status), "message": self.message,
        });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        (self.status, axum::Json(body)).into_response()
    }
}
