//! The engine's control API: a unix socket per volume, `<run_dir>/<volume>.sock`.
//!
//! Protocol: the client sends one JSON object on one line, `{"cmd": "...", ...args}`,
//! and reads one line back: `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "one-line reason"}`. One request per connection keeps
//! clients trivial (`socat` works). Control requests run on their own threads, never on
//! the I/O path.

use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
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
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another engine is already serving this volume", path.display()),
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let l = bind_private(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
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

/// Binds a unix socket at `path` that only its owner may connect to: it is bound in a
/// fresh mode-0700 directory beside `path`, made 0600, then renamed into place, so no
/// umask and no moment leaves it open to others. A directory this creates for `path` is
/// made 0700; an existing one is left as it is.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut r = [0u8; 4];
    longhorn_replica::auth::fill_random(&mut r)?;
    let tmp = dir.join(format!(".s{}", longhorn_replica::auth::hex(&r)));
    std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    let inner = tmp.join("s");
    let bound = (|| {
        let l = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&tmp);
    bound
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(s: UnixStream, h: Handler) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let mut rd = BufReader::new(&s);
    let reply = match rd.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Value>(&line) {
            Ok(req) if req.get("cmd").and_then(|c| c.as_str()).is_some() => match h(&req) {
                Ok(v) => json!({"ok": true, "result": v}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Ok(_) => json!({"ok": false, "error": "request has no \"cmd\" string"}),
            Err(e) => json!({"ok": false, "error": format!("request is not JSON: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("reading request: {e}")}),
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
