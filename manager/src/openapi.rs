//! `GET /v1/openapi.json`: the OpenAPI 3 document of the API (written by hand from
//! manager/API.md; tests/tests/manager_fuzz.rs checks the server against it).

use axum::Json;
use serde_json::Value;

static DOC: &str = include_str!("openapi.json");

pub fn doc() -> Value {
    serde_json::from_str(DOC).unwrap_or(Value::Null)
}

pub async fn document() -> Json<Value> {
    Json(doc())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_parses() {
        let d = super::doc();
        assert_eq!(d["openapi"].as_str().map(|s| s.starts_with("3.")), Some(true));
    }
}
