//! `longhorn csi`: the CSI driver `driver.longhorn.io` (crate `longhorn-csi`), serving
//! gRPC on a unix socket for kubelet and the CSI sidecars.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct CsiArgs {
    /// The gRPC socket (the sidecars' --csi-address).
    #[arg(long, default_value = "unix:///csi/csi.sock", env = "CSI_ENDPOINT")]
    endpoint: String,
    /// This host's node id (Kubernetes: the node's name). Default: the hostname.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// A host's manager, HOST=URL; repeat for every host the controller places volumes
    /// on. Default: this node's manager at http://127.0.0.1:9500.
    #[arg(long = "manager", value_name = "HOST=URL")]
    managers: Vec<String>,
    /// A file whose first line is the managers' API token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA certificate(s), PEM, that sign the managers' HTTPS certificates; needed
    /// for https:// manager URLs.
    #[arg(long)]
    manager_ca: Option<PathBuf>,
    /// Which services to serve: controller, node, or all.
    #[arg(long, default_value = "all", value_parser = ["controller", "node", "all"])]
    mode: String,
    /// The block device frontend volumes are attached with (blockdev, ublk, nbd,
    /// fuse). Default: the manager's (ublk, else nbd, else fuse).
    #[arg(long)]
    frontend: Option<String>,
    /// Longhorn's replica-soft-anti-affinity: with fewer hosts than a volume's
    /// replicas, put several on one host (else the volume is refused).
    #[arg(long)]
    replica_soft_anti_affinity: bool,
    /// Seconds a host's manager must go unanswered before the controller serves the
    /// volumes recorded there from another host (their record copies on the replicas'
    /// hosts); the replicas' engine lease still refuses a second engine while the first
    /// is alive and reaches them.
    #[arg(long, default_value_t = 60)]
    failover_after: u64,
}

pub fn run(a: CsiArgs) -> Result<()> {
    let node_id = match a.node_id {
        Some(n) if !n.trim().is_empty() => n.trim().to_string(),
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the hostname")?.trim().to_string(),
    };
    let mut managers = Vec::new();
    for m in &a.managers {
        let Some((host, url)) = m.split_once('=') else {
            bail!("--manager {m:?}: expected HOST=URL");
        };
        if host.is_empty() || !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--manager {m:?}: expected HOST=http://ADDR:PORT");
        }
        if managers.iter().any(|(h, _): &(String, String)| h == host) {
            bail!("--manager: host {host:?} is given twice");
        }
        managers.push((host.to_string(), url.to_string()));
    }
    if managers.is_empty() {
        managers.push((node_id.clone(), "http://127.0.0.1:9500".to_string()));
    }
    let token = match &a.token_file {
        Some(p) => Some(longhorn_manager::read_token(p)?),
        None => None,
    };
    let roots = match &a.manager_ca {
        Some(p) => Some(longhorn_csi::manager::Roots::read(p).map_err(|e| anyhow::anyhow!("--manager-ca {e}"))?),
        None => None,
    };
    if roots.is_none() {
        if let Some((h, u)) = managers.iter().find(|(_, u)| u.starts_with("https://")) {
            bail!("--manager {h}={u}: https needs --manager-ca (the CA that signed the managers' certificates)");
        }
    }
    longhorn_csi::serve(longhorn_csi::Config {
        endpoint: longhorn_csi::socket_path(&a.endpoint)?,
        node_id,
        managers,
        token,
        roots,
        controller: a.mode != "node",
        node: a.mode != "controller",
        frontend: a.frontend,
        soft_anti_affinity: a.replica_soft_anti_affinity,
        failover_after: std::time::Duration::from_secs(a.failover_after.max(1)),
    })
}
