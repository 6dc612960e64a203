//! Checks of what clients send, each error naming its field (API.md, Conventions).

use crate::error::{ApiError, ApiResult};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Volume, snapshot, job and backup names: `[a-z0-9][a-z0-9.-]{0,62}`, no `..`. Also
/// passes the project's one rule for names that become paths
/// (`longhorn_replica::names`), of which this is a subset.
pub fn name(field: &str, s: &str) -> ApiResult<()> {
    let ok_first = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if s.is_empty() || s.len() > 63 || !ok_first || !ok_rest || s.contains("..") {
        return Err(ApiError::bad(
            field,
            format!("{field}: {s:?} is not a valid name (1-63 of a-z, 0-9, '.', '-', starting with a letter or digit, no \"..\")"),
        ));
    }
    longhorn_replica::names::check(field, s).map_err(|e| ApiError::bad(field, format!("{field}: {e}")))?;
    Ok(())
}

/// Largest volume accepted: 64 TiB (sparse files make any size cheap to create, but
/// the arithmetic of offsets must stay far from overflow).
const MAX_SIZE: u64 = 64 << 40;

/// A size: a number of bytes, or a string of bytes or with a unit (`10Gi`, `512Mi`,
/// `10G`: binary units, as the CLI's). A multiple of 4096, at least 4096.
/// Refuses a volume size the filesystem under `dir` cannot hold in one sparse file
/// (ext4: 16 TiB - 4 KiB), so such a volume is refused at create rather than failing
/// at its first attach.
pub fn fits(field: &str, dir: &std::path::Path, size: u64) -> ApiResult<()> {
    match longhorn_replica::expand::probe(dir, size) {
        Ok(()) => Ok(()),
        Err(longhorn_replica::store::StoreError::TooLarge { source, .. }) => Err(ApiError::bad(
            field,
            format!("{field}: {size} bytes: the filesystem of {} holds no file that large ({source})", dir.display()),
        )),
        Err(e) => Err(ApiError::internal(anyhow::anyhow!("checking that {} holds {size} bytes: {e}", dir.display()))),
    }
}

pub fn size(field: &str, v: &Value) -> ApiResult<u64> {
    let bad = |m: String| ApiError::bad(field, format!("{field}: {m}"));
    let n: u64 = match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| bad(format!("{n} is not a whole number of bytes")))?,
        Value::String(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let num: u64 = num.parse().map_err(|_| bad(format!("{s:?} is not a size")))?;
            let mult: u64 = match unit {
                "" => 1,
                "K" | "Ki" => 1 << 10,
                "M" | "Mi" => 1 << 20,
                "G" | "Gi" => 1 << 30,
                "T" | "Ti" => 1 << 40,
                u => return Err(bad(format!("unknown unit {u:?} in {s:?} (Ki, Mi, Gi, Ti)"))),
            };
            num.checked_mul(mult).ok_or_else(|| bad(format!("{s:?} is too large")))?
        }
        other => return Err(bad(format!("must be a number of bytes or a string like \"10Gi\", not {other}"))),
    };
    if n < 4096 || n % 4096 != 0 {
        return Err(bad(format!("{n} bytes: must be a multiple of 4096, at least 4096")));
    }
    if n > MAX_SIZE {
        return Err(bad(format!("{n} bytes: at most {MAX_SIZE} (64 TiB)")));
    }
    Ok(n)
}

/// A JSON object body (`{}` for an empty body).
pub fn object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("body", "the body must be a JSON object")),
        Err(e) => Err(ApiError::bad("body", format!("the body is not JSON: {e}"))),
    }
}

/// Refuses fields the action does not know, so a typo is not silently ignored.
pub fn only(m: &Map<String, Value>, allowed: &[&str]) -> ApiResult<()> {
    for k in m.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad(k, format!("unknown field {k:?} (expected one of {})", allowed.join(", "))));
        }
    }
    Ok(())
}

pub fn opt_str<'a>(m: &'a Map<String, Value>, field: &str) -> ApiResult<Option<&'a str>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad(field, format!("{field}: must be a string"))),
    }
}

pub fn req_str<'a>(m: &'a Map<String, Value>, field: &str) -> ApiResult<&'a str> {
    opt_str(m, field)?.ok_or_else(|| ApiError::bad(field, format!("{field}: required")))
}

pub fn opt_bool(m: &Map<String, Value>, field: &str) -> ApiResult<Option<bool>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::bad(field, format!("{field}: must be true or false"))),
    }
}

/// Labels: a map of strings to strings; keys non-empty, at most 64 of them.
pub fn labels(m: &Map<String, Value>, field: &str) -> ApiResult<HashMap<String, String>> {
    let mut out = HashMap::new();
    match m.get(field) {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            if o.len() > 64 {
                return Err(ApiError::bad(field, format!("{field}: at most 64 labels")));
            }
            for (k, v) in o {
                let Some(v) = v.as_str() else {
                    return Err(ApiError::bad(field, format!("{field}: label {k:?} must have a string value")));
                };
                if k.is_empty() || k.len() > 253 || v.len() > 1024 || k.chars().any(|c| c.is_control()) || v.chars().any(|c| c.is_control()) {
                    return Err(ApiError::bad(field, format!("{field}: label {k:?}: keys 1-253 characters, values at most 1024, no control characters")));
                }
                out.insert(k.clone(), v.to_string());
            }
        }
        Some(_) => return Err(ApiError::bad(field, format!("{field}: must map strings to strings"))),
    }
    Ok(out)
}

/// The engine's frontend for the API's value. The value is checked with
/// `disableFrontend` too (then it is not used): a typo is refused, not ignored.
pub fn frontend(field: &str, f: &str, disable: bool) -> ApiResult<&'static str> {
    let kind = match f {
        "" | "blockdev" => "auto",
        "ublk" => "ublk",
        "nbd" => "nbd",
        "fuse" => "fuse",
        other => return Err(ApiError::bad(field, format!("{field}: {other:?} is not one of blockdev, ublk, nbd, fuse"))),
    };
    Ok(if disable { "none" } else { kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        for ok in ["vol1", "a", "v-1.2", "0abc"] {
            assert!(name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Vol", "a/b", "..", "a..b", "-a", ".a", "a b", &"x".repeat(64)] {
            let e = name("name", bad).expect_err(bad);
            assert_eq!(e.field.as_deref(), Some("name"));
        }
    }

    #[test]
    fn frontends() {
        assert_eq!(frontend("frontend", "", false).ok(), Some("auto"));
        assert_eq!(frontend("frontend", "ublk", false).ok(), Some("ublk"));
        assert_eq!(frontend("frontend", "nbd", true).ok(), Some("none"));
        assert_eq!(frontend("frontend", "", true).ok(), Some("none"));
        for disable in [false, true] {
            let e = frontend("frontend", "iscsi", disable).expect_err("not a frontend");
            assert_eq!(e.field.as_deref(), Some("frontend"));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size("size", &json!("10Gi")).ok(), Some(10 << 30));
        assert_eq!(size("size", &json!("512Mi")).ok(), Some(512 << 20));
        assert_eq!(size("size", &json!("1G")).ok(), Some(1 << 30));
        assert_eq!(size("size", &json!(8192)).ok(), Some(8192));
        assert_eq!(size("size", &json!("1073741824")).ok(), Some(1 << 30));
        for bad in [json!(0), json!(4095), json!("1000"), json!("1Xi"), json!(-1), json!(1.5), json!(null), json!("99999999999999999999Gi"), json!("65Ti")] {
            assert!(size("size", &bad).is_err(), "{bad}");
        }
    }
}

/// A volume's secret as the API carries it: 64 hex digits.
pub fn secret(field: &str, s: &str) -> ApiResult<longhorn_replica::auth::Key> {
    longhorn_replica::auth::Key::parse(s).ok_or_else(|| ApiError::bad(field, format!("{field}: the volume's secret, 64 hex digits")))
}
