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
    use serde_json::Value;

    #[test]
    fn the_document_parses() {
        let d = super::doc();
        assert_eq!(d["openapi"].as_str().map(|s| s.starts_with("3.")), Some(true));
    }

    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    /// Every `$ref` names a component that is there.
    #[test]
    fn every_reference_resolves() {
        let d = super::doc();
        let mut all = Vec::new();
        refs(&d, &mut all);
        assert!(all.len() > 20, "{} references", all.len());
        for r in all {
            let ptr = r.strip_prefix('#').unwrap_or_else(|| panic!("{r}: not a local reference"));
            assert!(d.pointer(ptr).is_some_and(|t| t.is_object()), "{r} does not resolve");
        }
    }

    /// The routes of `crate::router`, each with its methods.
    #[test]
    fn every_route_is_documented() {
        let d = super::doc();
        let routes: [(&str, &[&str]); 15] = [
            ("/v1/node", &["get"]),
            ("/v1/replicas", &["get", "post"]),
            ("/v1/replicas/{volume}/{name}", &["get", "post", "delete"]),
            ("/v1/volumes", &["get", "post"]),
            ("/v1/volumes/{name}", &["get", "post", "delete"]),
            ("/v1/backupvolumes", &["get"]),
            ("/v1/backupvolumes/{name}", &["get", "post", "delete"]),
            ("/v1/settings", &["get"]),
            ("/v1/settings/{name}", &["get", "put"]),
            ("/v1/secrets", &["get"]),
            ("/v1/secrets/{name}", &["get", "put", "delete"]),
            ("/v1/events", &["get"]),
            ("/v1/openapi.json", &["get"]),
            ("/metrics", &["get"]),
            ("/healthz", &["get"]),
        ];
        for (path, methods) in routes {
            for m in methods {
                let op = &d["paths"][path][m];
                assert!(op.is_object(), "{} {path} is not documented", m.to_uppercase());
                assert!(op["responses"]["200"].is_object() || op["responses"]["201"].is_object(), "{m} {path}: no success response");
            }
        }
    }

    /// Every action `api::volume_action` dispatches (its match arms, read from the
    /// source) is in the document's `action` enum, so a new action cannot go
    /// undocumented.
    #[test]
    fn every_volume_action_is_documented() {
        let src = include_str!("api.rs");
        let start = src.find("pub async fn volume_action(").expect("volume_action in api.rs");
        let body = &src[start..start + src[start..].find("\n}\n").expect("end of volume_action")];
        let mut arms = Vec::new();
        for line in body.lines() {
            let Some(pat) = line.trim().strip_suffix(" => {").or_else(|| line.trim().split_once(" => ").map(|(p, _)| p)) else { continue };
            // A guarded arm names its actions before the guard.
            let pat = pat.split(" if ").next().unwrap_or(pat);
            if pat.starts_with('"') {
                arms.extend(pat.split(" | ").map(|a| a.trim_matches('"').to_string()));
            }
        }
        assert!(arms.len() > 10 && arms.contains(&"expand".to_string()), "arms read from api.rs: {arms:?}");
        let d = super::doc();
        let params = d["paths"]["/v1/volumes/{name}"]["post"]["parameters"].as_array().expect("parameters");
        let action = params.iter().find(|p| p["name"] == "action").expect("the action parameter");
        let documented: Vec<&str> = action["schema"]["enum"].as_array().expect("enum").iter().filter_map(|v| v.as_str()).collect();
        for a in &arms {
            assert!(documented.contains(&a.as_str()), "action {a:?} is not in the OpenAPI action enum");
        }
    }
}
