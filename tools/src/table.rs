//! Plain tables for people (`--json` is for scripts).

use serde_json::Value;

pub fn print(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{:<width$}", c, width = w[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// One row per element of the JSON list `v`.
pub fn rows(v: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array().map(|a| a.iter().map(row).collect()).unwrap_or_default()
}

/// A field as a cell: strings as they are, other values as JSON, "-" when absent.
pub fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

pub fn human_size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0}{}", U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}

pub fn volumes(vols: &[Value]) {
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                s(v, "name"),
                v.get("size").and_then(|x| x.as_u64()).map(human_size).unwrap_or_default(),
                s(v, "state"),
                format!("{}/{}", s(v, "replicas_rw"), s(v, "replicas_total")),
                s(v, "frontend"),
                s(v, "endpoint"),
                s(v, "access_mode"),
                s(v, "share_state"),
                s(v, "share_endpoint"),
            ]
        })
        .collect();
    print(&["NAME", "SIZE", "STATE", "REPLICAS", "FRONTEND", "ENDPOINT", "ACCESS", "SHARE", "EXPORT"], &rows);
}

pub fn replicas(reps: &[Value]) {
    let rows: Vec<Vec<String>> = reps
        .iter()
        .map(|r| {
            let p = &r["progress"];
            let progress = match (p["bytes_total"].as_u64(), p["bytes_done"].as_u64()) {
                (Some(t), Some(d)) if t > 0 => format!("{}% of {}", d * 100 / t, human_size(t)),
                _ => "-".into(),
            };
            vec![s(r, "address"), s(r, "mode"), s(r, "revision"), s(r, "head"), progress, s(r, "error")]
        })
        .collect();
    print(&["ADDRESS", "MODE", "REVISION", "HEAD", "REBUILD", "ERROR"], &rows);
}
