//! The client of one host's manager (`manager/API.md`), the driver's and the operator
//! CLI's (`longhorn manager volume ...`). Blocking (ureq): the gRPC handlers call it
//! from tokio's blocking pool. Every answer that is not 2xx comes
//! back as an [`ApiError`] with the manager's status and message, so the driver can map
//! it to the gRPC code the CSI spec asks for.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

/// The certificates a client trusts for the managers' HTTPS (`--manager-ca`): the CA
/// that signed every manager's certificate, or the certificates themselves.
#[derive(Clone)]
pub struct Roots(Arc<Vec<ureq::tls::Certificate<'static>>>);

impl Roots {
    /// Reads every PEM certificate of `path`; errors name the file.
    pub fn read(path: &std::path::Path) -> Result<Roots, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => return Err(format!("{}: not PEM: {e}", path.display())),
            }
        }
        if certs.is_empty() {
            return Err(format!("{}: holds no certificate (PEM BEGIN CERTIFICATE)", path.display()));
        }
        Ok(Roots(Arc::new(certs)))
    }
}

#[derive(Debug)]
pub struct ApiError {
    /// HTTP status; 0 when the manager could not be reached.
    pub status: u16,
    pub message: String,
}

impl ApiError {
    /// The gRPC code of a manager's answer: its 400s name the bad field (as CSI's
    /// INVALID_ARGUMENT should), 404 is NOT_FOUND, 409 a state that forbids the call
    /// now (FAILED_PRECONDITION); a manager that cannot be reached is UNAVAILABLE, so
    /// the sidecars retry.
    pub fn status(&self) -> Status {
        let m = self.message.clone();
        match self.status {
            400 | 413 | 415 => Status::invalid_argument(m),
            401 | 403 => Status::permission_denied(m),
            404 => Status::not_found(m),
            409 => Status::failed_precondition(m),
            0 | 502 | 503 | 504 => Status::unavailable(m),
            _ => Status::internal(m),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub struct Manager {
    /// The host's name: the CSI node id of the node plugin beside this manager.
    pub host: String,
    pub base: String,
    token: Option<String>,
    /// For actions, which may take as long as the manager's own longest call.
    agent: ureq::Agent,
    /// For reads, which the manager answers from what it has sampled: a host cut off
    /// holds such a call (and the loop that made it) seconds, not minutes.
    quick: ureq::Agent,
}

impl Manager {
    /// The driver's: reads give up after 15 s, actions after 180 s.
    pub fn new(host: &str, base: &str, token: Option<String>, roots: Option<&Roots>) -> Manager {
        Manager::with_timeouts(host, base, token, roots, 15, 180)
    }

    /// The operator's (no host name: errors name the URL): every call may take as long
    /// as a listing of a slow backup target.
    pub fn for_cli(base: &str, token: Option<String>, roots: Option<&Roots>) -> Manager {
        Manager::with_timeouts("", base, token, roots, 600, 600)
    }

    fn with_timeouts(host: &str, base: &str, token: Option<String>, roots: Option<&Roots>, read_secs: u64, action_secs: u64) -> Manager {
        // Only the given roots are trusted (no system store): the managers' CA is the
        // operator's own.
        let mut tls = ureq::tls::TlsConfig::builder().unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        if let Some(r) = roots {
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(r.0.clone()));
        }
        let tls = tls.build();
        let agent = |total: u64| -> ureq::Agent {
            ureq::Agent::config_builder()
                .tls_config(tls.clone())
                .http_status_as_error(false)
                // A host that is down must not hold a call (and the volume's lock) for
                // minutes: it is UNAVAILABLE, and the sidecars retry.
                .timeout_connect(Some(Duration::from_secs(3)))
                .timeout_global(Some(Duration::from_secs(total)))
                .build()
                .into()
        };
        Manager {
            host: host.to_string(),
            base: base.trim_end_matches('/').to_string(),
            token,
            // Longer than the manager's own longest call (an engine's control call, 130 s).
            agent: agent(action_secs),
            quick: agent(read_secs),
        }
    }

    fn who(&self) -> String {
        if self.host.is_empty() {
            format!("the manager at {}", self.base)
        } else {
            format!("the manager of host {:?} at {}", self.host, self.base)
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> ApiResult<Value> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let resp = match method {
            "GET" | "DELETE" => {
                let mut r = if method == "GET" { self.quick.get(&url) } else { self.agent.delete(&url) };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = if method == "PUT" { self.agent.put(&url) } else { self.agent.post(&url) };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.header("Content-Type", "application/json").send(body.unwrap_or(json!({})).to_string())
            }
        };
        let mut resp = resp.map_err(|e| ApiError {
            status: 0,
            message: format!("{} does not answer: {e}", self.who()),
        })?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| ApiError {
            status: 0,
            message: format!("{method} {url}: reading the answer: {e}"),
        })?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !(200..300).contains(&status) {
            let message = v.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| v.to_string());
            let message = if self.host.is_empty() { message } else { format!("host {:?}: {message}", self.host) };
            return Err(ApiError { status, message });
        }
        Ok(v)
    }

    /// A volume, or None when this host does not have it.
    pub fn volume(&self, name: &str) -> ApiResult<Option<Value>> {
        match self.call("GET", &format!("/v1/volumes/{name}"), None) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn volumes(&self) -> ApiResult<Vec<Value>> {
        let v = self.call("GET", "/v1/volumes", None)?;
        Ok(v["data"].as_array().cloned().unwrap_or_default())
    }

    pub fn action(&self, volume: &str, action: &str, body: Value) -> ApiResult<Value> {
        self.call("POST", &format!("/v1/volumes/{volume}?action={action}"), Some(body))
    }

    /// The host's storage (`GET /v1/node`).
    pub fn node(&self) -> ApiResult<Value> {
        self.call("GET", "/v1/node", None)
    }
}
