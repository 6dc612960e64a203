//! The node service: a volume attached on this host (by ControllerPublishVolume) is
//! formatted if blank and mounted at the staging path, then bind-mounted into pods.

use crate::controller::{check_cap, vol_size, Cap};
use crate::{blocking, csi, ids, mount, Driver, TOPOLOGY_KEY};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

pub struct Node(pub Arc<Driver>);

fn need(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: missing")));
    }
    Ok(())
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

/// `nfs://IP:PORT/VOLUME` (the manager's shareEndpoint) as the server's address for
/// mount(8) (`[..]` around IPv6) and the port; the volume must be the one asked for.
fn share_source(ep: &str, volume: &str) -> Result<(String, u16), Status> {
    let bad = |why: &str| Status::invalid_argument(format!("publish_context.shareEndpoint: {ep:?} {why} (nfs://IP:PORT/{volume})"));
    let rest = ep.strip_prefix("nfs://").ok_or_else(|| bad("is not an NFS endpoint"))?;
    let (addr, path) = rest.split_once('/').ok_or_else(|| bad("names no export"))?;
    if path != volume {
        return Err(bad("is another volume's share"));
    }
    let sa: std::net::SocketAddr = addr.parse().map_err(|_| bad("has no IP:PORT"))?;
    let host = match sa.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    Ok((host, sa.port()))
}

/// Whether an NFS mount's source (`IP:/VOLUME`) is this volume's share.
fn shares_volume(source: &str, volume: &str) -> bool {
    source.rsplit_once(":/").is_some_and(|(_, v)| v == volume)
}

impl Driver {
    /// This host's attached volume and its block device, once the device is there.
    fn local_device(&self, id: &str) -> Result<(Value, PathBuf), Status> {
        if !ids::valid_name(id) {
            return Err(Status::not_found(format!("volume {id:?}: not found")));
        }
        let m = self.local()?;
        let t = Instant::now();
        loop {
            let v = m.volume(id).map_err(|e| e.status())?.ok_or_else(|| Status::not_found(format!("volume {id:?}: not on this host")))?;
            if v["state"] != "attached" {
                return Err(Status::failed_precondition(format!(
                    "volume {id:?} is {} on this host: ControllerPublishVolume attaches it first",
                    v["state"].as_str().unwrap_or("?")
                )));
            }
            let dev = v["endpoint"].as_str().map(PathBuf::from).filter(|p| p.is_absolute());
            if let Some(dev) = dev {
                if mount::rdev(&dev).is_ok() {
                    return Ok((v, dev));
                }
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(Status::failed_precondition(format!(
                    "volume {id:?} is attached but has no block device ({})",
                    v["endpoint"].as_str().unwrap_or("no endpoint")
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stage(&self, r: csi::NodeStageVolumeRequest) -> Result<csi::NodeStageVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        need("staging_target_path", &r.staging_target_path)?;
        let cap = check_cap(r.volume_capability.as_ref().ok_or_else(|| Status::invalid_argument("volume_capability: missing"))?)?;
        let _busy = self.hold(&r.volume_id)?;
        if cap.multi_node() {
            return self.stage_share(&r, &cap);
        }
        let (_, dev) = self.local_device(&r.volume_id)?;
        if cap.block {
            // A raw block volume is published straight from its device.
            return Ok(csi::NodeStageVolumeResponse {});
        }
        let staging = Path::new(&r.staging_target_path);
        let want = mount::rdev(&dev).map_err(internal)?;
        if let Some(m) = mount::mounted_at(staging).map_err(internal)? {
            if m.dev == want {
                return Ok(csi::NodeStageVolumeResponse {});
            }
            return Err(Status::already_exists(format!("{} already has {} mounted, not volume {}", staging.display(), m.source, r.volume_id)));
        }
        std::fs::create_dir_all(staging).map_err(|e| Status::internal(format!("creating {}: {e}", staging.display())))?;
        let asked = if cap.fs_type.is_empty() {
            ids::fs_type(r.volume_context.get("fsType").map(String::as_str).unwrap_or(""))?
        } else {
            ids::fs_type(&cap.fs_type)?
        };
        let fs = match mount::signature(&dev).map_err(internal)? {
            None => {
                tracing::info!(volume = r.volume_id, device = %dev.display(), fs = asked, "no signature on the device: making a filesystem");
                mount::mkfs(&dev, asked).map_err(internal)?;
                asked.to_string()
            }
            // What the volume holds is mounted as what it is, never reformatted.
            Some(t) if t == "ext4" || t == "xfs" => t,
            Some(t) => {
                return Err(Status::failed_precondition(format!(
                    "volume {} holds {t:?}, not a filesystem this driver mounts (ext4, xfs); it is left untouched",
                    r.volume_id
                )))
            }
        };
        // A volume expanded while unpublished: its filesystem grows with it here (ext4
        // before mounting, xfs once mounted), whether or not NodeExpandVolume follows.
        if fs == "ext4" && !cap.read_only() && mount::grow_ext4_offline(&dev).map_err(internal)? {
            tracing::info!(volume = r.volume_id, device = %dev.display(), "grew the ext4 filesystem to the device");
        }
        let mut opts = cap.mount_flags.clone();
        if cap.read_only() {
            opts.push("ro".into());
        }
        mount::mount(&dev, staging, &fs, &opts).map_err(internal)?;
        if fs == "xfs" && !cap.read_only() {
            if let Err(e) = mount::grow(&dev, staging, "xfs") {
                let _ = mount::umount(staging);
                return Err(internal(e));
            }
        }
        tracing::info!(volume = r.volume_id, staging = %staging.display(), fs, "staged");
        Ok(csi::NodeStageVolumeResponse {})
    }

    /// ReadWriteMany: the volume's NFSv4 share (on whichever host serves it) mounted at
    /// the staging path. Hard mounts, as Longhorn's: a share restarting makes I/O wait,
    /// never fail. The share may still be starting: the mount is tried for a minute.
    fn stage_share(&self, r: &csi::NodeStageVolumeRequest, cap: &Cap) -> Result<csi::NodeStageVolumeResponse, Status> {
        let ep = r.publish_context.get("shareEndpoint").map(String::as_str).unwrap_or("");
        let (ip, port) = share_source(ep, &r.volume_id)?;
        let source = format!("{ip}:/{}", r.volume_id);
        let staging = Path::new(&r.staging_target_path);
        if let Some(m) = mount::mounted_at(staging).map_err(internal)? {
            if m.fstype.starts_with("nfs") && m.source == source {
                return Ok(csi::NodeStageVolumeResponse {});
            }
            return Err(Status::already_exists(format!("{} already has {} mounted, not volume {}", staging.display(), m.source, r.volume_id)));
        }
        std::fs::create_dir_all(staging).map_err(|e| Status::internal(format!("creating {}: {e}", staging.display())))?;
        let mut opts: Vec<String> = vec!["vers=4.1".into(), format!("port={port}"), "hard".into(), "timeo=600".into(), "retrans=5".into()];
        opts.extend(cap.mount_flags.iter().cloned());
        if cap.read_only() {
            opts.push("ro".into());
        }
        let t = Instant::now();
        loop {
            match mount::mount_nfs(&ip, &format!("/{}", r.volume_id), staging, &opts) {
                Ok(()) => break,
                Err(e) if t.elapsed() > Duration::from_secs(60) => {
                    return Err(Status::unavailable(format!("mounting the share of volume {} ({ep}): {e:#}", r.volume_id)))
                }
                Err(e) => {
                    tracing::info!(volume = r.volume_id, share = ep, "the share does not answer yet: {e:#}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        tracing::info!(volume = r.volume_id, staging = %staging.display(), share = ep, "staged over NFS");
        Ok(csi::NodeStageVolumeResponse {})
    }

    fn unstage(&self, r: csi::NodeUnstageVolumeRequest) -> Result<csi::NodeUnstageVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        need("staging_target_path", &r.staging_target_path)?;
        let _busy = self.hold(&r.volume_id)?;
        let staging = Path::new(&r.staging_target_path);
        while mount::mounted_at(staging).map_err(internal)?.is_some() {
            mount::umount(staging).map_err(internal)?;
        }
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    fn publish(&self, r: csi::NodePublishVolumeRequest) -> Result<csi::NodePublishVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        need("target_path", &r.target_path)?;
        let cap: Cap = check_cap(r.volume_capability.as_ref().ok_or_else(|| Status::invalid_argument("volume_capability: missing"))?)?;
        if !cap.block {
            need("staging_target_path", &r.staging_target_path)?;
        }
        let _busy = self.hold(&r.volume_id)?;
        let target = Path::new(&r.target_path);
        let readonly = r.readonly || cap.read_only();
        if cap.multi_node() {
            return self.publish_share(&r, target, readonly);
        }
        let (_, dev) = self.local_device(&r.volume_id)?;
        let want = mount::rdev(&dev).map_err(internal)?;
        if let Some(m) = mount::mounted_at(target).map_err(internal)? {
            let ro = m.options.split(',').any(|o| o == "ro");
            if m.dev == want && ro == readonly {
                return Ok(csi::NodePublishVolumeResponse {});
            }
            return Err(Status::already_exists(format!(
                "{} is already published, {} (read-only {ro})",
                target.display(),
                if m.dev == want { "this volume" } else { "another device" }
            )));
        }
        if cap.block {
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Status::internal(format!("creating {}: {e}", dir.display())))?;
            }
            if !target.exists() {
                std::fs::File::create(target).map_err(|e| Status::internal(format!("creating {}: {e}", target.display())))?;
            }
            mount::bind(&dev, target, readonly).map_err(internal)?;
        } else {
            let staging = Path::new(&r.staging_target_path);
            match mount::mounted_at(staging).map_err(internal)? {
                Some(m) if m.dev == want => {}
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "volume {} is not staged at {} (NodeStageVolume first)",
                        r.volume_id,
                        staging.display()
                    )))
                }
            }
            std::fs::create_dir_all(target).map_err(|e| Status::internal(format!("creating {}: {e}", target.display())))?;
            mount::bind(staging, target, readonly).map_err(internal)?;
        }
        tracing::info!(volume = r.volume_id, target = %target.display(), readonly, block = cap.block, "published");
        Ok(csi::NodePublishVolumeResponse {})
    }

    /// ReadWriteMany: the staged NFS mount bound into the pod's directory.
    fn publish_share(&self, r: &csi::NodePublishVolumeRequest, target: &Path, readonly: bool) -> Result<csi::NodePublishVolumeResponse, Status> {
        let staging = Path::new(&r.staging_target_path);
        let staged = mount::mounted_at(staging).map_err(internal)?.filter(|m| m.fstype.starts_with("nfs") && shares_volume(&m.source, &r.volume_id));
        let Some(staged) = staged else {
            return Err(Status::failed_precondition(format!("volume {} is not staged at {} (NodeStageVolume first)", r.volume_id, staging.display())));
        };
        if let Some(m) = mount::mounted_at(target).map_err(internal)? {
            let ro = m.options.split(',').any(|o| o == "ro");
            if m.dev == staged.dev && ro == readonly {
                return Ok(csi::NodePublishVolumeResponse {});
            }
            return Err(Status::already_exists(format!("{} is already published, {} (read-only {ro})", target.display(), m.source)));
        }
        std::fs::create_dir_all(target).map_err(|e| Status::internal(format!("creating {}: {e}", target.display())))?;
        mount::bind(staging, target, readonly).map_err(internal)?;
        tracing::info!(volume = r.volume_id, target = %target.display(), readonly, "published the share");
        Ok(csi::NodePublishVolumeResponse {})
    }

    fn unpublish(&self, r: csi::NodeUnpublishVolumeRequest) -> Result<csi::NodeUnpublishVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        need("target_path", &r.target_path)?;
        let _busy = self.hold(&r.volume_id)?;
        let target = Path::new(&r.target_path);
        while mount::mounted_at(target).map_err(internal)?.is_some() {
            mount::umount(target).map_err(internal)?;
        }
        // The target is ours to remove once nothing is mounted on it (kubelet makes
        // the directory again for the next publish).
        match std::fs::symlink_metadata(target) {
            Ok(md) if md.is_dir() => {
                let _ = std::fs::remove_dir(target);
            }
            Ok(md) if md.is_file() => {
                let _ = std::fs::remove_file(target);
            }
            _ => {}
        }
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    /// Grows the filesystem on a volume the controller grew, where it is mounted (the
    /// staging path or a pod's). A raw block volume has nothing to grow here.
    fn node_expand(&self, r: csi::NodeExpandVolumeRequest) -> Result<csi::NodeExpandVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        need("volume_path", &r.volume_path)?;
        let block = match &r.volume_capability {
            Some(c) => check_cap(c)?.block,
            None => false,
        };
        let _busy = self.hold(&r.volume_id)?;
        // Mounted from the share: the filesystem grows where the volume is served.
        let path = Path::new(&r.volume_path);
        if mount::mounted_at(path).map_err(internal)?.is_some_and(|m| m.fstype.starts_with("nfs") && shares_volume(&m.source, &r.volume_id)) {
            return Ok(csi::NodeExpandVolumeResponse { capacity_bytes: 0 });
        }
        let (v, dev) = match self.local_device(&r.volume_id) {
            Ok(x) => x,
            Err(e) if e.code() == tonic::Code::FailedPrecondition => return Err(Status::not_found(e.message().to_string())),
            Err(e) => return Err(e),
        };
        let size = vol_size(&v) as i64;
        if block || !std::fs::metadata(path).map(|md| md.is_dir()).unwrap_or(false) {
            return Ok(csi::NodeExpandVolumeResponse { capacity_bytes: size });
        }
        let want = mount::rdev(&dev).map_err(internal)?;
        let m = mount::mounted_at(path).map_err(internal)?.filter(|m| m.dev == want);
        let Some(m) = m else {
            return Err(Status::not_found(format!("volume {} is not mounted at {}", r.volume_id, path.display())));
        };
        mount::grow(&dev, path, &m.fstype).map_err(internal)?;
        tracing::info!(volume = r.volume_id, path = %path.display(), fs = m.fstype, size, "grew the filesystem");
        Ok(csi::NodeExpandVolumeResponse { capacity_bytes: size })
    }

    fn stats(&self, r: csi::NodeGetVolumeStatsRequest) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        need("volume_id", &r.volume_id)?;
        need("volume_path", &r.volume_path)?;
        let path = Path::new(&r.volume_path);
        use csi::volume_usage::Unit;
        let fs_usage = |u: mount::Usage| {
            vec![
                csi::VolumeUsage { available: u.available as i64, total: u.total as i64, used: u.used as i64, unit: Unit::Bytes as i32 },
                csi::VolumeUsage {
                    available: u.inodes_free as i64,
                    total: u.inodes as i64,
                    used: u.inodes.saturating_sub(u.inodes_free) as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        };
        // A ReadWriteMany volume mounted here from its share on another host: its
        // filesystem is what the mount shows.
        if let Some(m) = mount::mounted_at(path).map_err(internal)?.filter(|m| m.fstype.starts_with("nfs") && shares_volume(&m.source, &r.volume_id)) {
            let usage = fs_usage(mount::statvfs(path).map_err(internal)?);
            let message = format!("mounted at {} from the share {}", m.point, m.source);
            return Ok(csi::NodeGetVolumeStatsResponse { usage, volume_condition: Some(csi::VolumeCondition { abnormal: false, message }) });
        }
        let (v, dev) = match self.local_device(&r.volume_id) {
            Ok(x) => x,
            Err(e) if e.code() == tonic::Code::FailedPrecondition => return Err(Status::not_found(e.message().to_string())),
            Err(e) => return Err(e),
        };
        let want = mount::rdev(&dev).map_err(internal)?;
        let m = mount::mounted_at(path).map_err(internal)?;
        let Some(m) = m.filter(|m| m.dev == want) else {
            return Err(Status::not_found(format!("volume {} is not mounted at {}", r.volume_id, path.display())));
        };
        let usage = if std::fs::metadata(path).map(|md| md.is_dir()).unwrap_or(false) {
            fs_usage(mount::statvfs(path).map_err(internal)?)
        } else {
            vec![csi::VolumeUsage { available: 0, total: vol_size(&v) as i64, used: 0, unit: Unit::Bytes as i32 }]
        };
        let abnormal = v["robustness"] != "healthy";
        let message = format!("{} ({}), mounted at {}", v["robustness"].as_str().unwrap_or("unknown"), v["state"].as_str().unwrap_or(""), m.point);
        Ok(csi::NodeGetVolumeStatsResponse { usage, volume_condition: Some(csi::VolumeCondition { abnormal, message }) })
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    async fn node_stage_volume(&self, req: Request<csi::NodeStageVolumeRequest>) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let d = self.0.clone();
        let r = req.into_inner();
        blocking(move || d.stage(r)).await
    }
    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let d = self.0.clone();
        let r = req.into_inner();
        blocking(move || d.unstage(r)).await
    }
    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let d = self.0.clone();
        let r = req.into_inner();
        blocking(move || d.publish(r)).await
    }
    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let d = self.0.clone();
        let r = req.into_inner();
        blocking(move || d.unpublish(r)).await
    }
    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let d = self.0.clone();
        let r = req.into_inner();
        blocking(move || d.stats(r)).await
    }
    async fn node_expand_volume(&self, req: Request<csi::NodeExpandVolumeRequest>) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let d = self.0.clone();
        let r = req.into_inner();
        blocking(move || d.node_expand(r)).await
    }
    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{rpc::Type, Rpc, Type as C};
        let caps = [Type::StageUnstageVolume, Type::GetVolumeStats, Type::VolumeCondition, Type::SingleNodeMultiWriter, Type::ExpandVolume]
            .into_iter()
            .map(|t| csi::NodeServiceCapability { r#type: Some(C::Rpc(Rpc { r#type: t as i32 })) })
            .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities: caps }))
    }
    async fn node_get_info(&self, _: Request<csi::NodeGetInfoRequest>) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.0.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology { segments: HashMap::from([(TOPOLOGY_KEY.to_string(), self.0.node_id.clone())]) }),
        }))
    }
}
