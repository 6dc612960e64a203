//! `longhorn csi`: the CSI driver `driver.longhorn.io`. It is a client of the hosts'
//! managers: the controller service places and drives volumes through their REST APIs,
//! the node service asks its own host's manager for the volume's device and does the
//! filesystem work (mkfs, mount) on that host. It keeps no state of its own: what a
//! volume is, where it lives and whether it is attached is the managers' state, so a
//! restarted driver (or a second controller) sees what the first one made.
//!
//! Invariants:
//! - Every RPC is idempotent: a retry of a call that succeeded (or half succeeded)
//!   succeeds and leaves the same state (`ids` maps names deterministically).
//! - Calls on one volume run one at a time; a second one arriving meanwhile gets
//!   ABORTED, which the sidecars retry (the CSI spec's rule for operations pending).
//! - Nothing is formatted that holds a signature: mkfs runs only when `blkid -p` finds
//!   none on the device.

pub mod controller;
pub mod ids;
pub mod manager;
pub mod mount;
pub mod node;
pub mod placement;
pub mod failover;

use anyhow::{bail, Context, Result};
/// The CSI v1 messages, clients and service traits (re-exported for the tests' clients).
pub use bpfman_csi::v1 as csi;
use manager::Manager;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

pub const DRIVER_NAME: &str = "driver.longhorn.io";
/// The topology segment naming a host: a volume is accessible from the host that holds
/// it, which is also the node id of that host's node plugin.
pub const TOPOLOGY_KEY: &str = "topology.longhorn.io/host";

pub struct Config {
    /// The unix socket to serve gRPC on.
    pub endpoint: PathBuf,
    /// This host's name (the CSI node id; Kubernetes passes the node's name).
    pub node_id: String,
    /// Every host's manager, as (host, base URL); this host's is the one named node_id.
    pub managers: Vec<(String, String)>,
    pub token: Option<String>,
    /// The roots that sign the managers' HTTPS certificates (`--manager-ca`).
    pub roots: Option<manager::Roots>,
    pub controller: bool,
    pub node: bool,
    /// The block device frontend volumes are attached with (the manager's default
    /// when None: ublk, else nbd, else fuse).
    pub frontend: Option<String>,
    /// Longhorn's replica-soft-anti-affinity: with fewer hosts than replicas, put
    /// several on one host instead of refusing the volume.
    pub soft_anti_affinity: bool,
    /// How long a host's manager goes unanswered before its volumes are served
    /// elsewhere (see `failover`).
    pub failover_after: std::time::Duration,
}

/// A socket path from the forms the sidecars pass: `unix:///csi/csi.sock`,
/// `unix:/csi/csi.sock` or a plain path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let p = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("unix:")).unwrap_or(endpoint);
    if p.is_empty() || !p.starts_with('/') {
        bail!("--endpoint {endpoint:?}: not an absolute unix socket path (unix:///path/csi.sock)");
    }
    Ok(PathBuf::from(p))
}

pub struct Driver {
    pub node_id: String,
    pub managers: Vec<Manager>,
    pub frontend: Option<String>,
    pub soft_anti_affinity: bool,
    busy: Mutex<HashSet<String>>,
    pub failover_after: std::time::Duration,
    /// Hosts whose manager did not answer, since when (see `failover`).
    down_since: Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// One call's hold on a volume (or snapshot) name; dropped when the call ends.
pub struct Busy<'a> {
    d: &'a Driver,
    key: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.d.busy.lock() {
            b.remove(&self.key);
        }
    }
}

impl Driver {
    pub fn new(c: &Config) -> Driver {
        let managers = c.managers.iter().map(|(h, u)| Manager::new(h, u, c.token.clone(), c.roots.as_ref())).collect();
        Driver {
            node_id: c.node_id.clone(),
            managers,
            frontend: c.frontend.clone(),
            soft_anti_affinity: c.soft_anti_affinity,
            busy: Mutex::new(HashSet::new()),
            failover_after: c.failover_after,
            down_since: Mutex::new(Default::default()),
        }
    }

    pub fn hold(&self, key: &str) -> Result<Busy<'_>, Status> {
        let mut b = self.busy.lock().map_err(|_| Status::internal("lock poisoned"))?;
        if !b.insert(key.to_string()) {
            return Err(Status::aborted(format!("an operation on {key:?} is in progress; try again")));
        }
        Ok(Busy { d: self, key: key.to_string() })
    }

    pub fn manager_of(&self, host: &str) -> Option<&Manager> {
        self.managers.iter().find(|m| m.host == host)
    }

    /// This host's manager (the node plugin's).
    pub fn local(&self) -> Result<&Manager, Status> {
        self.manager_of(&self.node_id)
            .ok_or_else(|| Status::failed_precondition(format!("no manager is configured for this node {:?}", self.node_id)))
    }

    /// Which host has a volume. A host that does not answer makes the answer unknown
    /// (UNAVAILABLE), never "no such volume": a delete must not report success for a
    /// volume that lives on a host that is only down.
    ///
    /// A volume handed from one host's manager to another's is recorded by both for a
    /// moment (and by the first alone if the move stopped half-way): the record that
    /// was not handed off is the volume.
    pub fn find(&self, name: &str) -> Result<Option<(&Manager, serde_json::Value)>, Status> {
        let mut down = None;
        let mut handed = None;
        for m in &self.managers {
            match m.volume(name) {
                Ok(Some(v)) if v["state"] == "handedOff" => handed = handed.or(Some((m, v))),
                Ok(Some(v)) => return Ok(Some((m, v))),
                Ok(None) => {}
                Err(e) => down = Some(e),
            }
        }
        match (down, handed) {
            (Some(e), _) => Err(e.status()),
            (None, h) => Ok(h),
        }
    }
}

/// Runs a driver call on tokio's blocking pool (the managers' client and the mount
/// programs block).
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<Response<T>, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map(Response::new),
        Err(e) => Err(Status::internal(format!("the call's task failed: {e}"))),
    }
}

pub struct Identity {
    pub controller: bool,
    pub driver: Arc<Driver>,
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(&self, _: Request<csi::GetPluginInfoRequest>) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service::Type, Service, Type as Cap};
        let mut caps = vec![csi::PluginCapability { r#type: Some(Cap::Service(Service { r#type: Type::VolumeAccessibilityConstraints as i32 })) }];
        if self.controller {
            caps.push(csi::PluginCapability { r#type: Some(Cap::Service(Service { r#type: Type::ControllerService as i32 })) });
        }
        // Volumes grow while no node has them published, as Longhorn v1's do.
        use csi::plugin_capability::{volume_expansion, VolumeExpansion};
        caps.push(csi::PluginCapability {
            r#type: Some(Cap::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Offline as i32 })),
        });
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities: caps }))
    }

    /// Ready when the managers this plugin drives answer.
    async fn probe(&self, _: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        let d = self.driver.clone();
        let controller = self.controller;
        blocking(move || {
            let ms: Vec<&Manager> = if controller { d.managers.iter().collect() } else { d.local().into_iter().collect() };
            for m in ms {
                m.call("GET", "/healthz", None).map_err(|e| e.status())?;
            }
            Ok(csi::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}

/// Serves until SIGTERM or SIGINT; prints `listening unix:PATH` once the socket is bound.
pub fn serve(c: Config) -> Result<()> {
    if !c.controller && !c.node {
        bail!("nothing to serve: --mode must include controller or node");
    }
    if c.managers.is_empty() {
        bail!("no manager given (--manager HOST=URL)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        // A socket left by a driver that died is replaced; a live one or any other file is not ours.
        let listener = bind_private(&c.endpoint)?;
        let driver = Arc::new(Driver::new(&c));
        let identity = csi::identity_server::IdentityServer::new(Identity { controller: c.controller, driver: driver.clone() });
        let controller = c.controller.then(|| csi::controller_server::ControllerServer::new(controller::Controller(driver.clone())));
        let node = c.node.then(|| csi::node_server::NodeServer::new(node::Node(driver.clone())));
        if c.controller && driver.managers.len() > 1 {
            let d = driver.clone();
            std::thread::Builder::new()
                .name("reconcile".into())
                .spawn(move || placement::reconcile_forever(d))
                .context("starting the reconcile thread")?;
        }
        let router = tonic::transport::Server::builder().add_service(identity).add_optional_service(controller).add_optional_service(node);
        println!("listening unix:{}", c.endpoint.display());
        tracing::info!(endpoint = %c.endpoint.display(), node = c.node_id, controller = c.controller, node_service = c.node, "CSI driver serving");
        let stop = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        router
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), stop)
            .await
            .context("serving gRPC")?;
        let _ = std::fs::remove_file(&c.endpoint);
        tracing::info!("CSI driver stopped");
        Ok(())
    })
}

/// Binds the gRPC socket readable and writable by its owner only (kubelet and the
/// node plugin run as root), whatever the umask; a stale socket is replaced, one another
/// driver still serves is refused (see [`longhorn_replica::net::bind_private_unix`]).
fn bind_private(endpoint: &std::path::Path) -> Result<tokio::net::UnixListener> {
    let l = longhorn_replica::net::bind_private_unix(endpoint).context("binding the CSI endpoint")?;
    l.set_nonblocking(true).context("making the CSI endpoint non-blocking")?;
    tokio::net::UnixListener::from_std(l).context("registering the CSI endpoint")
}
