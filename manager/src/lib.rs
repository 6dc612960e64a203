//! `longhorn manager serve`: one daemon per host that owns the volumes of that host.
//!
//! It keeps one JSON state file per volume (`state.rs`), runs one `longhorn up`
//! process per attached volume (`procs.rs`; `up` supervises the replicas and the
//! engine and rebuilds failed replicas), talks to the engines through their control
//! sockets, and serves the REST API of manager/API.md (`api.rs`), the event stream,
//! Prometheus metrics and the embedded web UI. The HTTP stack (axum on tokio) is the
//! control plane only: no byte of volume data passes through this process.

pub mod api;
pub mod error;
pub mod events;
pub mod expand;
pub mod input;
pub mod metrics;
pub mod mgr;
pub mod openapi;
pub mod procs;
pub mod replicas;
pub mod settings;
pub mod spec;
pub mod state;
pub mod tls;
pub mod ui;
pub mod view;

use anyhow::{anyhow, Context, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use error::ApiError;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body (API.md: 413 beyond it).
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Required of every request (but /healthz) when set.
    pub token: Option<String>,
    /// The address of this host that its replicas for other hosts' engines listen on.
    pub replica_ip: std::net::IpAddr,
    /// HTTPS: the certificate chain and private key files (PEM); plain HTTP without.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Whether binding `addr` needs a token: anything but 127.0.0.1 and ::1 (API.md,
/// Backend notes: other 127.x addresses count as "elsewhere", so the rule is testable
/// on one host, and a wildcard bind is never open).
pub fn needs_token(addr: &SocketAddr) -> bool {
    let ip = addr.ip();
    !(ip == std::net::IpAddr::from([127, 0, 0, 1]) || ip == std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST))
}

/// Reads a token file: its first line, at least 16 characters.
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let t = std::fs::read_to_string(path).with_context(|| format!("reading the token file {}", path.display()))?;
    let t = t.lines().next().unwrap_or("").trim().to_string();
    if t.len() < 16 {
        return Err(anyhow!("{}: the token must be at least 16 characters", path.display()));
    }
    Ok(t)
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The host part of a `Host` header or an origin's authority (`[::1]:9500` -> `[::1]`).
fn host_only(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority)
}

/// Requests a browser could be made to send on a page of another site: a change
/// (anything but GET/HEAD) whose `Origin` is not this server, or, on a manager without
/// a token (loopback only), any request whose `Host` is not a loopback name (a DNS
/// rebinding page reaching 127.0.0.1 under its own name). Why it is refused, or None.
fn foreign(m: &mgr::Mgr, req: &Request) -> Option<String> {
    let h = req.headers();
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if m.cfg.token.is_none() && !host.is_empty() {
        let name = host_only(host);
        if !matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
            return Some(format!("Host {host:?} is not this loopback-only manager's address"));
        }
    }
    if req.method() != axum::http::Method::GET && req.method() != axum::http::Method::HEAD {
        if let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or(origin);
            if authority != host {
                return Some(format!("a {} from origin {origin:?} (not this server) is refused", req.method()));
            }
        }
    }
    None
}

async fn auth(State(m): State<mgr::Shared>, req: Request, next: Next) -> Response {
    if let Some(why) = foreign(&m, &req) {
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    if let Some(tok) = &m.cfg.token {
        let path = req.uri().path();
        // The UI's static files hold no data; the API they call does need the token.
        let open = path == "/healthz" || !(path.starts_with("/v1") || path == "/metrics");
        if !open {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !ct_eq(given.as_bytes(), tok.as_bytes()) {
                return ApiError::new(StatusCode::UNAUTHORIZED, "a valid Authorization: Bearer TOKEN is required").into_response();
            }
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    if !path.starts_with("/v1") {
        if let Some(r) = ui::serve(&path) {
            if req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD {
                return r;
            }
            return method_not_allowed(req).await;
        }
    }
    ApiError::not_found(format!("{path:?}")).into_response()
}

/// axum's own rejections (a path segment that is not UTF-8, say) are plain text; the
/// API answers every error in its JSON form.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let msg = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    ApiError::new(status, msg).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {}", req.method(), req.uri().path())).into_response()
}

pub fn router(m: mgr::Shared, shutdown: tokio::sync::watch::Receiver<bool>) -> Router {
    let v1 = Router::new()
        .route("/v1/volumes", get(api::list_volumes).post(api::create_volume))
        .route("/v1/volumes/{name}", get(api::get_volume).post(api::volume_action).delete(api::delete_volume))
        .route("/v1/backupvolumes", get(api::list_backup_volumes))
        .route(
            "/v1/backupvolumes/{name}",
            get(api::get_backup_volume).post(api::backup_volume_action).delete(api::delete_backup_volume),
        )
        .route("/v1/node", get(api::get_node))
        .route("/v1/replicas", get(replicas::list).post(replicas::create))
        .route("/v1/replicas/{volume}/{name}", get(replicas::get).post(replicas::action).delete(replicas::delete))
        .route("/v1/settings", get(api::list_settings))
        .route("/v1/settings/{name}", get(api::get_setting).put(api::put_setting))
        .route("/v1/secrets", get(api::list_secrets))
        .route("/v1/secrets/{name}", get(api::get_secret).put(api::put_secret).delete(api::delete_secret))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"ok": true})) }));
    let ev = Router::new().route("/v1/events", get(events::events)).with_state((m.clone(), shutdown));
    v1.with_state(m.clone())
        .merge(ev)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(m, auth))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(json_errors))
}

/// One manager per state directory: a second one would restart the same dead volumes
/// and take the first one's new engines and replicas for leftovers to stop. The lock
/// (flock, released when the process dies however it dies) is held while serving.
fn lock_state_dir(state_dir: &std::path::Path) -> Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let p = state_dir.join("manager.lock");
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).with_context(|| format!("opening {}", p.display()))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(anyhow!("another manager already serves {} (it holds {})", state_dir.display(), p.display()));
        }
        return Err(anyhow!(e).context(format!("locking {}", p.display())));
    }
    Ok(f)
}

/// Runs the manager until SIGTERM or SIGINT. Volumes keep running when it stops: a
/// later manager adopts them.
pub fn serve(cfg: Config) -> Result<()> {
    if needs_token(&cfg.listen) && cfg.token.is_none() {
        return Err(anyhow!("--listen {}: beyond 127.0.0.1 and ::1 the API needs --token-file", cfg.listen));
    }
    // Checked before anything starts: a bad certificate is an error at once, not a
    // manager that serves nothing.
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(tls::server_config(cert, key)?),
        None => None,
    };
    if tls.is_none() && !cfg.listen.ip().is_loopback() {
        tracing::warn!(listen = %cfg.listen, "serving plain HTTP beyond loopback: the token and the volumes' secrets cross the network in clear (give --tls-cert and --tls-key)");
    }
    for d in [&cfg.data_dir, &cfg.run_dir, &cfg.state_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let _lock = lock_state_dir(&cfg.state_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("manager")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(cfg, tls))?;
    // Worker threads blocked on an engine must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn run(cfg: Config, tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>) -> Result<()> {
    let m: mgr::Shared = Arc::new(mgr::Mgr::new(cfg.clone())?);
    m.adopt();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The supervisor: restarts, samples, events; once a second.
    let m2 = m.clone();
    let mut stop2 = stop_rx.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base = format!("{scheme}://{addr}");
    tokio::spawn(async move {
        let mut last = std::collections::HashMap::new();
        loop {
            m2.tick(&mut last, &base).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop2.changed() => return,
            }
        }
    });
    let app = router(m.clone(), stop_rx.clone());
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), state_dir = %cfg.state_dir.display(), "manager serving");
    println!("listening {scheme}://{addr}");
    let _ = std::io::stdout().flush();
    let mut stop3 = stop_rx.clone();
    let stopped = async move {
        let _ = stop3.changed().await;
    };
    type Server = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;
    let server: Server = match tls {
        Some(t) => Box::pin(std::future::IntoFuture::into_future(
            axum::serve(tls::TlsListener::new(listener, t)?, app).with_graceful_shutdown(stopped),
        )),
        None => Box::pin(std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(stopped))),
    };
    let signals = async {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut t, mut i) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                tracing::error!("cannot install signal handlers");
                return std::future::pending::<()>().await;
            }
        };
        tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
    };
    let mut server = server;
    tokio::select! {
        r = &mut server => return r.context("serving HTTP"),
        _ = signals => {}
    }
    tracing::info!("stopping the manager (volumes keep running)");
    let _ = stop_tx.send(true);
    // Streams end on the stop signal; a client that holds a connection open anyway
    // does not hold the exit past a few seconds.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(r) => r.context("serving HTTP")?,
        Err(_) => tracing::warn!("connections still open after 5 s; exiting anyway"),
    }
    tracing::info!("manager stopped");
    Ok(())
}
