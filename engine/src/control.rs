//! The engine's control API: a unix socket per volume, `<run_dir>/<volume>.sock`.
//!
//! Protocol: the client sends one JSON object on one line, `{"cmd": "...", ...args}`,
//! and reads one line back: `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "one-line reason"}`. One request per connection keeps
//! clients trivial (`socat` works). Control requests run on their own threads, never on
//! the I/O path.

use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

pub type Handler = Arc<dyn Fn(&Value) -> Result<Value, String> + Send + Sync>;

pub fn socket_path(run_dir: &Path, volume: &str) -> PathBuf {
    run_dir.join(format!("{volume}.sock"))
}

pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Listens on `path`; a stale socket is replaced, a live one (another engine serving
    /// the volume) is an error.
    pub fn start(path: &Path, handler: Handler) -> io::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            // The run directory is the engines' own: root only, whatever it was made with.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        let l = longhorn_replica::net::bind_private_unix(path).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => {
                io::Error::new(e.kind(), format!("{}: another engine is already serving this volume", path.display()))
            }
            _ => e,
        })?;
        std::thread::Builder::new().name("control".into()).spawn(move || {
            for c in l.incoming() {
                match c {
                    Ok(s) => {
                        let h = handler.clone();
                        let _ = std::thread::Builder::new().name("control-req".into()).spawn(move || serve_one(s, h));
                    }
                    Err(e) => {
                        warn!("control socket accept: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
        Ok(ControlServer { path: path.to_path_buf() })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Longest request line accepted. Requests are small (a backup-create with its
/// credentials and labels is a few KiB); without a bound, a client that never sends a
/// newline would grow the engine's memory for as long as it keeps sending.
pub const MAX_REQUEST_LEN: u64 = 1 << 20;

/// Reads one request line (at most [`MAX_REQUEST_LEN`] bytes) and parses it: a JSON
/// object with a "cmd" string. `Ok(None)` when the client sent nothing.
pub fn read_request(r: impl Read) -> Result<Option<Value>, String> {
    let mut line = String::new();
    let mut rd = BufReader::new(r.take(MAX_REQUEST_LEN + 1));
    match rd.read_line(&mut line) {
        Ok(0) => return Ok(None),
        Ok(n) if n as u64 > MAX_REQUEST_LEN => {
            return Err(format!("request is longer than {MAX_REQUEST_LEN} bytes"));
        }
        Ok(_) => {}
        Err(e) => return Err(format!("reading request: {e}")),
    }
    match serde_json::from_str::<Value>(&line) {
        Ok(req) if req.get("cmd").and_then(|c| c.as_str()).is_some() => Ok(Some(req)),
        Ok(_) => Err("request has no \"cmd\" string".into()),
        Err(e) => Err(format!("request is not JSON: {e}")),
    }
}

fn serve_one(s: UnixStream, h: Handler) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let reply = match read_request(&s) {
        Ok(None) => return,
        Ok(Some(req)) => match h(&req) {
            Ok(v) => json!({"ok": true, "result": v}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        Err(e) => json!({"ok": false, "error": e}),
    };
    let mut out = reply.to_string();
    out.push('\n');
    let _ = (&s).write_all(out.as_bytes());
}

/// Sends one request to the engine serving `volume` and returns its result.
pub fn call(run_dir: &Path, volume: &str, req: &Value) -> Result<Value, String> {
    longhorn_replica::names::check("volume", volume)?;
    let path = socket_path(run_dir, volume);
    let s = UnixStream::connect(&path)
        .map_err(|e| format!("no engine is serving volume {volume:?} ({}: {e})", path.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut line = req.to_string();
    line.push('\n');
    (&s).write_all(line.as_bytes()).map_err(|e| format!("sending to the engine: {e}"))?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).map_err(|e| format!("reading the engine's answer: {e}"))?;
    let v: Value = serde_json::from_str(&resp).map_err(|e| format!("engine answered with bad JSON: {e}"))?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    } else {
        Err(v.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let req = read_request(&b"{\"cmd\":\"volume-info\"}\nrest"[..]).expect("parses").expect("a request");
        assert_eq!(req["cmd"], "volume-info");
        assert_eq!(read_request(&b""[..]), Ok(None));
        assert!(read_request(&b"{\"name\":1}\n"[..]).expect_err("no cmd").contains("cmd"));
        assert!(read_request(&b"{\"cmd\":\n"[..]).expect_err("bad JSON").contains("not JSON"));
    }

    /// A client that never sends a newline is cut off at the limit instead of growing
    /// the engine's memory without end (std::io::repeat never ends).
    #[test]
    fn endless_request_is_refused_at_the_limit() {
        let e = read_request(std::io::repeat(b' ')).expect_err("too long");
        assert!(e.contains("longer than"), "{e}");
    }
}
