//! The CSI driver's sanity suite: a real `longhorn csi` on a unix socket, driven over
//! gRPC the way kubelet and the sidecars drive it, in front of a real manager whose
//! volumes get real block devices (FUSE + loop on this kernel), real ext4 filesystems
//! and real mounts. Every RPC the driver offers, its idempotency (the same call twice,
//! the delete of what is gone), and refusals with the gRPC code the CSI spec asks for.

use longhorn_tests::csi::{block_cap, csi, fails, mount_cap, ok, Driver};
use longhorn_tests::manager::Manager;
use longhorn_tests::*;
use csi::volume_capability::access_mode::Mode;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tonic::Code;

/// Longhorn's recurring jobs parameter as its StorageClass shows it.
const SEED_JOBS: &str = r#"[{"name":"snap","task":"snapshot","cron":"*/1 * * * *","retain":1},
 {"name":"backup","task":"backup","cron":"*/2 * * * *","retain":1}]"#;

fn tmp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in(test_root()).expect("temp dir")
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn create_req(name: &str, size: i64, cap: csi::VolumeCapability, p: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        parameters: params(p),
        ..Default::default()
    }
}

/// Whatever a test mounted is unmounted when it ends, pass or fail, so a failed run
/// leaves no mount holding a loop device and a volume.
struct Mounts(Vec<PathBuf>);
impl Drop for Mounts {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            for _ in 0..4 {
                if !sh_try(&format!("mountpoint -q '{}'", p.display())).0 {
                    break;
                }
                let _ = sh_try(&format!("umount '{}'", p.display()));
            }
        }
    }
}

fn mounted(p: &Path) -> bool {
    sh_try(&format!("mountpoint -q '{}'", p.display())).0
}

#[test]
fn csi_sanity_on_one_host() {
    for tool in ["mkfs.ext4", "e2fsck", "mkfs.xfs", "xfs_repair", "blkid", "mount", "umount", "mountpoint", "nfs-ls", "ganesha.nfsd"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    let t = tmp("lh-csi-");
    // Mount points are compared with /proc/self/mountinfo, which has resolved paths.
    let base = std::fs::canonicalize(t.path()).expect("the test directory");
    let m = Manager::start(base.as_path());
    let store = base.as_path().join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    let (st, v) = m.call("PUT", "/v1/settings/backup-target", Some(&json!({"value": format!("file://{}", store.display())})));
    assert_eq!(st, 200, "{v}");
    let d = Driver::start(base.as_path(), "host-a", &[("host-a", &m.url)], &[]);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&d.sock).expect("the CSI socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the CSI socket is mode {mode:o}, not 600 (with a permissive umask, anyone on the host could publish volumes)");
    }
    let mounts = Mounts(Vec::new());
    let mut mounts = mounts;
    let rt = &d.rt;
    let snw = || mount_cap(Mode::SingleNodeWriter, "ext4");

    // --- identity ---
    let info = ok("GetPluginInfo", rt.block_on(d.identity().get_plugin_info(csi::GetPluginInfoRequest {})));
    assert_eq!(info.name, "driver.longhorn.io");
    assert!(!info.vendor_version.is_empty());
    let caps = ok("GetPluginCapabilities", rt.block_on(d.identity().get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})));
    let svc: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    use csi::plugin_capability::service::Type as Svc;
    assert!(svc.contains(&(Svc::ControllerService as i32)) && svc.contains(&(Svc::VolumeAccessibilityConstraints as i32)), "{caps:?}");
    let probe = ok("Probe", rt.block_on(d.identity().probe(csi::ProbeRequest {})));
    assert_eq!(probe.ready, Some(true));
    let ccaps = ok("ControllerGetCapabilities", rt.block_on(d.controller().controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})));
    let rpcs: Vec<i32> = ccaps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    use csi::controller_service_capability::rpc::Type as Rpc;
    for want in [Rpc::CreateDeleteVolume, Rpc::PublishUnpublishVolume, Rpc::ListVolumes, Rpc::GetCapacity, Rpc::CreateDeleteSnapshot, Rpc::ListSnapshots] {
        assert!(rpcs.contains(&(want as i32)), "{want:?} missing from {rpcs:?}");
    }
    let ninfo = ok("NodeGetInfo", rt.block_on(d.node().node_get_info(csi::NodeGetInfoRequest {})));
    assert_eq!(ninfo.node_id, "host-a");
    assert_eq!(ninfo.accessible_topology.expect("topology").segments.get("topology.longhorn.io/host").map(String::as_str), Some("host-a"));

    // --- CreateVolume refusals: nothing is made by any of them ---
    let ctl = || d.controller();
    let bad = |what: &str, r: csi::CreateVolumeRequest, code: Code, names: &str| {
        let msg = fails(what, rt.block_on(ctl().create_volume(r)), code);
        assert!(msg.contains(names), "{what}: the message does not name {names:?}: {msg}");
    };
    bad("no name", create_req("", 1 << 26, snw(), &[]), Code::InvalidArgument, "name");
    bad(
        "no capabilities",
        csi::CreateVolumeRequest { name: "csi-x".into(), ..Default::default() },
        Code::InvalidArgument,
        "volume_capabilities",
    );
    bad("many readers", create_req("csi-x", 1 << 26, mount_cap(Mode::MultiNodeReaderOnly, ""), &[]), Code::InvalidArgument, "MULTI_NODE_READER_ONLY");
    bad("shared raw block", create_req("csi-x", 1 << 26, block_cap(Mode::MultiNodeMultiWriter), &[]), Code::InvalidArgument, "block");
    bad("btrfs", create_req("csi-x", 1 << 26, mount_cap(Mode::SingleNodeWriter, "btrfs"), &[]), Code::InvalidArgument, "btrfs");
    bad("0 replicas", create_req("csi-x", 1 << 26, snw(), &[("numberOfReplicas", "0")]), Code::InvalidArgument, "numberOfReplicas");
    bad("unknown parameter", create_req("csi-x", 1 << 26, snw(), &[("replicaCount", "2")]), Code::InvalidArgument, "replicaCount");
    bad(
        "required above limit",
        csi::CreateVolumeRequest {
            capacity_range: Some(csi::CapacityRange { required_bytes: 1 << 27, limit_bytes: 1 << 26 }),
            ..create_req("csi-x", 0, snw(), &[])
        },
        Code::OutOfRange,
        "limit_bytes",
    );
    // The bad recurring-job specs `longhorn job add` refuses are refused here too,
    // naming the field.
    for (jobs, field) in BAD_JOB_SPECS {
        bad(&format!("recurringJobs {jobs}"), create_req("csi-x", 1 << 26, snw(), &[("recurringJobs", jobs)]), Code::InvalidArgument, field);
    }
    let none = ok("ListVolumes", rt.block_on(ctl().list_volumes(csi::ListVolumesRequest::default())));
    assert!(none.entries.is_empty(), "a refused CreateVolume made something: {none:?}");
    assert!(m.get("/v1/volumes")["data"].as_array().is_some_and(|a| a.is_empty()));

    // --- CreateVolume, the same again, and the same name with another size ---
    let seed = [("numberOfReplicas", "2"), ("staleReplicaTimeout", "30"), ("fromBackup", ""), ("recurringJobs", SEED_JOBS), ("fsType", "ext4")];
    let v1 = ok("CreateVolume", rt.block_on(ctl().create_volume(create_req("csi-sanity-v1", 64 << 20, snw(), &seed)))).volume.expect("volume");
    assert_eq!(v1.volume_id, "csi-sanity-v1");
    assert_eq!(v1.capacity_bytes, 64 << 20);
    assert_eq!(v1.accessible_topology[0].segments.get("topology.longhorn.io/host").map(String::as_str), Some("host-a"));
    let again = ok("CreateVolume again", rt.block_on(ctl().create_volume(create_req("csi-sanity-v1", 64 << 20, snw(), &seed)))).volume.expect("volume");
    assert_eq!(again.volume_id, v1.volume_id);
    assert_eq!(again.capacity_bytes, v1.capacity_bytes);
    fails("CreateVolume other size", rt.block_on(ctl().create_volume(create_req("csi-sanity-v1", 128 << 20, snw(), &seed))), Code::AlreadyExists);
    let mv = m.volume("csi-sanity-v1");
    assert_eq!(mv["numberOfReplicas"], 2, "{mv}");
    assert_eq!(mv["staleReplicaTimeout"], 30, "{mv}");
    let jobs: Vec<&str> = mv["recurringJobs"].as_array().into_iter().flatten().filter_map(|j| j["name"].as_str()).collect();
    assert_eq!(jobs, ["snap", "backup"], "{mv}");
    // A raw block volume of one replica.
    let blk = ok("CreateVolume block", rt.block_on(ctl().create_volume(create_req("csi-sanity-blk", 32 << 20, block_cap(Mode::SingleNodeWriter), &[("numberOfReplicas", "1")]))))
        .volume
        .expect("volume");

    // --- ValidateVolumeCapabilities, ListVolumes (paged), GetCapacity ---
    let vr = |id: &str, cap: csi::VolumeCapability| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![cap],
        ..Default::default()
    };
    let yes = ok("Validate", rt.block_on(ctl().validate_volume_capabilities(vr("csi-sanity-v1", snw()))));
    assert!(yes.confirmed.is_some(), "{yes:?}");
    let no = ok("Validate RWX of RWO", rt.block_on(ctl().validate_volume_capabilities(vr("csi-sanity-v1", mount_cap(Mode::MultiNodeMultiWriter, "")))));
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");
    fails("Validate missing", rt.block_on(ctl().validate_volume_capabilities(vr("csi-nope", snw()))), Code::NotFound);
    let p1 = ok("ListVolumes page 1", rt.block_on(ctl().list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: String::new() })));
    assert_eq!(p1.entries.len(), 1);
    assert!(!p1.next_token.is_empty());
    let p2 = ok("ListVolumes page 2", rt.block_on(ctl().list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: p1.next_token.clone() })));
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    let ids: Vec<String> = p1.entries.iter().chain(&p2.entries).filter_map(|e| e.volume.as_ref()).map(|v| v.volume_id.clone()).collect();
    assert_eq!(ids, ["csi-sanity-blk", "csi-sanity-v1"]);
    fails("ListVolumes bad token", rt.block_on(ctl().list_volumes(csi::ListVolumesRequest { max_entries: 0, starting_token: "junk".into() })), Code::Aborted);
    let cap = ok("GetCapacity", rt.block_on(ctl().get_capacity(csi::GetCapacityRequest::default())));
    assert!(cap.available_capacity > 64 << 20, "{cap:?}");

    // --- ControllerPublish: the engine starts on the host, with a block device ---
    let publish = |id: &str, node: &str, cap: csi::VolumeCapability| csi::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        ..Default::default()
    };
    fails("publish to an unknown node", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-v1", "host-z", snw()))), Code::NotFound);
    fails("publish an unknown volume", rt.block_on(ctl().controller_publish_volume(publish("csi-nope", "host-a", snw()))), Code::NotFound);
    let pc = ok("ControllerPublish", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-v1", "host-a", snw()))));
    assert_eq!(pc.publish_context.get("devicePath").map(String::as_str), Some("/dev/longhorn/csi-sanity-v1"), "{pc:?}");
    let pc2 = ok("ControllerPublish again", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-v1", "host-a", snw()))));
    assert_eq!(pc2.publish_context, pc.publish_context);
    assert_eq!(m.volume("csi-sanity-v1")["state"], "attached");

    // --- NodeStage: a blank device gets ext4; staged twice is staged once ---
    let staging = base.as_path().join("staging/csi-sanity-v1");
    let stage = |id: &str, path: &Path, cap: csi::VolumeCapability| csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.display().to_string(),
        volume_capability: Some(cap),
        publish_context: pc.publish_context.clone(),
        ..Default::default()
    };
    mounts.0.push(staging.clone());
    fails("stage without a path", rt.block_on(d.node().node_stage_volume(stage("csi-sanity-v1", Path::new(""), snw()))), Code::InvalidArgument);
    ok("NodeStage", rt.block_on(d.node().node_stage_volume(stage("csi-sanity-v1", &staging, snw()))));
    assert!(mounted(&staging));
    assert_eq!(sh("blkid -p -o value -s TYPE /dev/longhorn/csi-sanity-v1").trim(), "ext4");
    ok("NodeStage again", rt.block_on(d.node().node_stage_volume(stage("csi-sanity-v1", &staging, snw()))));
    let n = sh(&format!("grep -c ' {} ' /proc/self/mountinfo", staging.display()));
    assert_eq!(n.trim(), "1", "staged twice is mounted twice");

    // --- NodePublish: a bind mount per pod, read-only honoured ---
    let pub_req = |id: &str, target: &Path, cap: csi::VolumeCapability, ro: bool| csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly: ro,
        publish_context: pc.publish_context.clone(),
        ..Default::default()
    };
    let pod1 = base.as_path().join("pods/p1/mount");
    let pod2 = base.as_path().join("pods/p2/mount");
    mounts.0.push(pod1.clone());
    mounts.0.push(pod2.clone());
    ok("NodePublish", rt.block_on(d.node().node_publish_volume(pub_req("csi-sanity-v1", &pod1, snw(), false))));
    ok("NodePublish again", rt.block_on(d.node().node_publish_volume(pub_req("csi-sanity-v1", &pod1, snw(), false))));
    fails("NodePublish the same target read-only", rt.block_on(d.node().node_publish_volume(pub_req("csi-sanity-v1", &pod1, snw(), true))), Code::AlreadyExists);
    sh(&format!("head -c 3000000 /dev/urandom > '{0}/data.bin' && echo hello > '{0}/hello.txt' && sync", pod1.display()));
    let sum = sh(&format!("sha256sum < '{}/data.bin'", pod1.display()));
    ok("NodePublish read-only", rt.block_on(d.node().node_publish_volume(pub_req("csi-sanity-v1", &pod2, snw(), true))));
    assert_eq!(sh(&format!("cat '{}/hello.txt'", pod2.display())).trim(), "hello");
    let (wrote, out) = sh_try(&format!("echo x > '{}/ro.txt'", pod2.display()));
    assert!(!wrote, "a read-only publish took a write");
    assert!(out.contains("Read-only"), "{out}");

    // --- NodeGetVolumeStats ---
    let stats = ok(
        "NodeGetVolumeStats",
        rt.block_on(d.node().node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "csi-sanity-v1".into(),
            volume_path: pod1.display().to_string(),
            ..Default::default()
        })),
    );
    let bytes = stats.usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32).expect("bytes usage");
    assert!(bytes.total > 40 << 20 && bytes.total <= 64 << 20 && bytes.used >= 3_000_000, "{stats:?}");
    assert!(stats.usage.iter().any(|u| u.unit == csi::volume_usage::Unit::Inodes as i32 && u.total > 0), "{stats:?}");
    assert!(stats.volume_condition.is_some(), "{stats:?}");
    fails(
        "NodeGetVolumeStats of a path not published",
        rt.block_on(d.node().node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "csi-sanity-v1".into(),
            volume_path: base.as_path().display().to_string(),
            ..Default::default()
        })),
        Code::NotFound,
    );

    // --- unpublish, unstage, ControllerUnpublish: each twice ---
    let unpub = |target: &Path| csi::NodeUnpublishVolumeRequest { volume_id: "csi-sanity-v1".into(), target_path: target.display().to_string() };
    for p in [&pod1, &pod2, &pod1] {
        ok("NodeUnpublish", rt.block_on(d.node().node_unpublish_volume(unpub(p))));
        assert!(!mounted(p) && !p.exists(), "{} is still there", p.display());
    }
    let unstage = csi::NodeUnstageVolumeRequest { volume_id: "csi-sanity-v1".into(), staging_target_path: staging.display().to_string() };
    ok("NodeUnstage", rt.block_on(d.node().node_unstage_volume(unstage.clone())));
    ok("NodeUnstage again", rt.block_on(d.node().node_unstage_volume(unstage.clone())));
    assert!(!mounted(&staging));
    let (clean, out) = sh_try("e2fsck -fn /dev/longhorn/csi-sanity-v1");
    assert!(clean, "e2fsck after unstage: {out}");
    let unpub_c = csi::ControllerUnpublishVolumeRequest { volume_id: "csi-sanity-v1".into(), node_id: "host-a".into(), ..Default::default() };
    ok("ControllerUnpublish", rt.block_on(ctl().controller_unpublish_volume(unpub_c.clone())));
    assert_eq!(m.volume("csi-sanity-v1")["state"], "detached");
    ok("ControllerUnpublish again", rt.block_on(ctl().controller_unpublish_volume(unpub_c.clone())));

    // --- published again: the filesystem is kept (never formatted twice) ---
    ok("ControllerPublish 2", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-v1", "host-a", snw()))));
    ok("NodeStage 2", rt.block_on(d.node().node_stage_volume(stage("csi-sanity-v1", &staging, snw()))));
    ok("NodePublish 2", rt.block_on(d.node().node_publish_volume(pub_req("csi-sanity-v1", &pod1, snw(), false))));
    assert_eq!(sh(&format!("cat '{}/hello.txt'", pod1.display())).trim(), "hello");
    assert_eq!(sh(&format!("sha256sum < '{}/data.bin'", pod1.display())), sum);
    // Expansion is offline (the plugin says so): refused while published.
    let grow = |bytes: i64| csi::ControllerExpandVolumeRequest {
        volume_id: "csi-sanity-v1".into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capability: Some(snw()),
        ..Default::default()
    };
    fails("ControllerExpand while published", rt.block_on(ctl().controller_expand_volume(grow(96 << 20))), Code::FailedPrecondition);
    ok("NodeUnpublish 2", rt.block_on(d.node().node_unpublish_volume(unpub(&pod1))));
    ok("NodeUnstage 2", rt.block_on(d.node().node_unstage_volume(unstage.clone())));
    ok("ControllerUnpublish 2", rt.block_on(ctl().controller_unpublish_volume(unpub_c.clone())));
    let ex = ok("ControllerExpand", rt.block_on(ctl().controller_expand_volume(grow(96 << 20))));
    assert!(ex.capacity_bytes == 96 << 20 && ex.node_expansion_required, "{ex:?}");
    let ex = ok("ControllerExpand again", rt.block_on(ctl().controller_expand_volume(grow(96 << 20))));
    assert_eq!(ex.capacity_bytes, 96 << 20);
    fails("ControllerExpand of a missing volume", rt.block_on(ctl().controller_expand_volume(csi::ControllerExpandVolumeRequest { volume_id: "csi-nope".into(), ..grow(96 << 20) })), Code::NotFound);
    assert_eq!(m.volume("csi-sanity-v1")["size"], (96u64 << 20).to_string());

    // --- a raw block volume: published as the device itself ---
    let bcap = || block_cap(Mode::SingleNodeWriter);
    let bpc = ok("ControllerPublish block", rt.block_on(ctl().controller_publish_volume(publish(&blk.volume_id, "host-a", bcap()))));
    let bstage = base.as_path().join("staging/blk");
    ok(
        "NodeStage block",
        rt.block_on(d.node().node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: blk.volume_id.clone(),
            staging_target_path: bstage.display().to_string(),
            volume_capability: Some(bcap()),
            publish_context: bpc.publish_context.clone(),
            ..Default::default()
        })),
    );
    let bdev = base.as_path().join("pods/p3/dev");
    mounts.0.push(bdev.clone());
    let bpub = csi::NodePublishVolumeRequest {
        volume_id: blk.volume_id.clone(),
        staging_target_path: bstage.display().to_string(),
        target_path: bdev.display().to_string(),
        volume_capability: Some(bcap()),
        publish_context: bpc.publish_context.clone(),
        ..Default::default()
    };
    ok("NodePublish block", rt.block_on(d.node().node_publish_volume(bpub.clone())));
    let src = base.as_path().join("blk.src");
    random_file(&src, 4 << 20);
    sh(&format!("dd if='{}' of='{}' bs=1M oflag=direct conv=fsync status=none", src.display(), bdev.display()));
    // Read back through the device node the manager made, not the bind mount.
    sh(&format!("cmp -n {} '{}' /dev/longhorn/csi-sanity-blk", 4 << 20, src.display()));
    ok("NodeUnpublish block", rt.block_on(d.node().node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: blk.volume_id.clone(),
        target_path: bdev.display().to_string(),
    })));
    assert!(!mounted(&bdev) && !bdev.exists());
    ok("ControllerUnpublish block", rt.block_on(ctl().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: blk.volume_id.clone(),
        node_id: "host-a".into(),
        ..Default::default()
    })));

    // --- snapshots: Longhorn snapshots in the chain, and backups (type: bak) ---
    let snap_req = |name: &str, vol: &str, kind: &str| csi::CreateSnapshotRequest {
        source_volume_id: vol.into(),
        name: name.into(),
        parameters: params(&[("type", kind)]),
        ..Default::default()
    };
    fails("snapshot of a missing volume", rt.block_on(ctl().create_snapshot(snap_req("snap-x", "csi-nope", "snap"))), Code::NotFound);
    fails("snapshot of a bad type", rt.block_on(ctl().create_snapshot(snap_req("snap-x", "csi-sanity-v1", "clone"))), Code::InvalidArgument);
    // Detached: the driver attaches the volume (no block device) for the call only.
    let s1 = ok("CreateSnapshot", rt.block_on(ctl().create_snapshot(snap_req("snap-1", "csi-sanity-v1", "snap")))).snapshot.expect("snapshot");
    assert_eq!(s1.snapshot_id, "snap://csi-sanity-v1/snap-1");
    assert!(s1.ready_to_use && s1.creation_time.is_some(), "{s1:?}");
    assert_eq!(m.volume("csi-sanity-v1")["state"], "detached", "the call left the volume attached");
    let data_paths = m.data_paths("csi-sanity-v1");
    for p in &data_paths {
        assert!(p.join("volume-snap-snap-1.img").exists(), "no snapshot file in {}", p.display());
    }
    let s1b = ok("CreateSnapshot again", rt.block_on(ctl().create_snapshot(snap_req("snap-1", "csi-sanity-v1", "snap")))).snapshot.expect("snapshot");
    assert_eq!(s1b.snapshot_id, s1.snapshot_id);
    // ListSnapshots reads the chains of attached volumes.
    ok("ControllerPublish 3", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-v1", "host-a", snw()))));
    // A name is the driver's across volumes. (Only chains of attached volumes are read
    // for that: the driver does not start every detached volume to look.)
    fails("the same snapshot name on another volume", rt.block_on(ctl().create_snapshot(snap_req("snap-1", "csi-sanity-blk", "snap"))), Code::AlreadyExists);
    let ls = ok(
        "ListSnapshots by id",
        rt.block_on(ctl().list_snapshots(csi::ListSnapshotsRequest { snapshot_id: s1.snapshot_id.clone(), ..Default::default() })),
    );
    assert_eq!(ls.entries.len(), 1, "{ls:?}");
    let ls = ok(
        "ListSnapshots by source",
        rt.block_on(ctl().list_snapshots(csi::ListSnapshotsRequest { source_volume_id: "csi-sanity-v1".into(), ..Default::default() })),
    );
    assert!(ls.entries.iter().any(|e| e.snapshot.as_ref().is_some_and(|s| s.snapshot_id == s1.snapshot_id)), "{ls:?}");
    // The filesystem grows to the expanded device where it is mounted, files kept.
    ok("NodeStage 3", rt.block_on(d.node().node_stage_volume(stage("csi-sanity-v1", &staging, snw()))));
    // ext4 grows offline as it is staged (an online grow needs CAP_SYS_RESOURCE, which
    // a node plugin has and this test's host does not).
    let staged = sh(&format!("df -B1 --output=size '{}' | tail -1", staging.display())).trim().parse::<u64>().expect("df");
    assert!(staged > 80 << 20, "the filesystem did not grow at staging: {staged} bytes");
    let nx = ok(
        "NodeExpand",
        rt.block_on(d.node().node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "csi-sanity-v1".into(),
            volume_path: staging.display().to_string(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 96 << 20, limit_bytes: 0 }),
            volume_capability: Some(snw()),
            ..Default::default()
        })),
    );
    assert_eq!(nx.capacity_bytes, 96 << 20);
    let after = sh(&format!("df -B1 --output=size '{}' | tail -1", staging.display())).trim().parse::<u64>().expect("df");
    assert_eq!(after, staged);
    assert_eq!(sh(&format!("sha256sum < '{}/data.bin'", staging.display())), sum);
    ok("NodeUnstage 3", rt.block_on(d.node().node_unstage_volume(unstage.clone())));
    let (clean, out) = sh_try("e2fsck -fn /dev/longhorn/csi-sanity-v1");
    assert!(clean, "e2fsck after the expansion: {out}");

    // A backup of the attached volume; the snapshotter polls until ready_to_use.
    let mut bak = ok("CreateSnapshot bak", rt.block_on(ctl().create_snapshot(snap_req("bak-1", "csi-sanity-v1", "bak")))).snapshot.expect("snapshot");
    let t0 = std::time::Instant::now();
    while !bak.ready_to_use {
        assert!(t0.elapsed().as_secs() < 120, "the backup is not ready in 120 s: {bak:?}");
        std::thread::sleep(std::time::Duration::from_millis(500));
        bak = ok("CreateSnapshot bak again", rt.block_on(ctl().create_snapshot(snap_req("bak-1", "csi-sanity-v1", "bak")))).snapshot.expect("snapshot");
    }
    assert!(bak.snapshot_id.starts_with("bak://csi-sanity-v1/backup-"), "{bak:?}");
    ok("ControllerUnpublish 3", rt.block_on(ctl().controller_unpublish_volume(unpub_c.clone())));

    // --- a new volume from the backup holds the same files ---
    let from = csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: bak.snapshot_id.clone() })),
        }),
        ..create_req("csi-sanity-restored", 96 << 20, snw(), &[("numberOfReplicas", "1")])
    };
    let rv = ok("CreateVolume from a backup", rt.block_on(ctl().create_volume(from.clone()))).volume.expect("volume");
    assert!(rv.content_source.is_some(), "{rv:?}");
    m.wait_volume("csi-sanity-restored", 120, "restored", |v| v["state"] == "detached");
    let rpc = ok("ControllerPublish restored", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-restored", "host-a", snw()))));
    let rstage = base.as_path().join("staging/restored");
    let rpod = base.as_path().join("pods/p4/mount");
    mounts.0.push(rstage.clone());
    mounts.0.push(rpod.clone());
    ok(
        "NodeStage restored",
        rt.block_on(d.node().node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "csi-sanity-restored".into(),
            staging_target_path: rstage.display().to_string(),
            volume_capability: Some(snw()),
            publish_context: rpc.publish_context.clone(),
            ..Default::default()
        })),
    );
    ok(
        "NodePublish restored",
        rt.block_on(d.node().node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: "csi-sanity-restored".into(),
            staging_target_path: rstage.display().to_string(),
            target_path: rpod.display().to_string(),
            volume_capability: Some(snw()),
            ..Default::default()
        })),
    );
    assert_eq!(sh(&format!("cat '{}/hello.txt'", rpod.display())).trim(), "hello");
    assert_eq!(sh(&format!("sha256sum < '{}/data.bin'", rpod.display())), sum);
    ok("NodeUnpublish restored", rt.block_on(d.node().node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: "csi-sanity-restored".into(),
        target_path: rpod.display().to_string(),
    })));
    ok("NodeUnstage restored", rt.block_on(d.node().node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "csi-sanity-restored".into(),
        staging_target_path: rstage.display().to_string(),
    })));

    // --- xfs: made, written, expanded while unpublished, grown when staged again ---
    let xcap = || mount_cap(Mode::SingleNodeWriter, "xfs");
    ok("CreateVolume xfs", rt.block_on(ctl().create_volume(create_req("csi-sanity-xfs", 320 << 20, xcap(), &[("numberOfReplicas", "1")]))));
    let xstage = base.as_path().join("staging/xfs");
    mounts.0.push(xstage.clone());
    let xs = |cap: csi::VolumeCapability| csi::NodeStageVolumeRequest {
        volume_id: "csi-sanity-xfs".into(),
        staging_target_path: xstage.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    };
    let xunstage = csi::NodeUnstageVolumeRequest { volume_id: "csi-sanity-xfs".into(), staging_target_path: xstage.display().to_string() };
    let xunpub = csi::ControllerUnpublishVolumeRequest { volume_id: "csi-sanity-xfs".into(), node_id: "host-a".into(), ..Default::default() };
    ok("ControllerPublish xfs", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-xfs", "host-a", xcap()))));
    ok("NodeStage xfs", rt.block_on(d.node().node_stage_volume(xs(xcap()))));
    assert_eq!(sh("blkid -p -o value -s TYPE /dev/longhorn/csi-sanity-xfs").trim(), "xfs");
    sh(&format!("echo xfs-data > '{}/x.txt' && sync", xstage.display()));
    let xbefore = sh(&format!("df -B1 --output=size '{}' | tail -1", xstage.display())).trim().parse::<u64>().expect("df");
    ok("NodeUnstage xfs", rt.block_on(d.node().node_unstage_volume(xunstage.clone())));
    ok("ControllerUnpublish xfs", rt.block_on(ctl().controller_unpublish_volume(xunpub.clone())));
    ok(
        "ControllerExpand xfs",
        rt.block_on(ctl().controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "csi-sanity-xfs".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 448 << 20, limit_bytes: 0 }),
            volume_capability: Some(xcap()),
            ..Default::default()
        })),
    );
    ok("ControllerPublish xfs 2", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-xfs", "host-a", xcap()))));
    ok("NodeStage xfs 2", rt.block_on(d.node().node_stage_volume(xs(xcap()))));
    ok(
        "NodeExpand xfs",
        rt.block_on(d.node().node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "csi-sanity-xfs".into(),
            volume_path: xstage.display().to_string(),
            volume_capability: Some(xcap()),
            ..Default::default()
        })),
    );
    let xafter = sh(&format!("df -B1 --output=size '{}' | tail -1", xstage.display())).trim().parse::<u64>().expect("df");
    assert!(xafter > xbefore + (100 << 20), "xfs did not grow: {xbefore} -> {xafter}");
    assert_eq!(sh(&format!("cat '{}/x.txt'", xstage.display())).trim(), "xfs-data");
    ok("NodeUnstage xfs 2", rt.block_on(d.node().node_unstage_volume(xunstage.clone())));
    let (clean, out) = sh_try("xfs_repair -n /dev/longhorn/csi-sanity-xfs");
    assert!(clean, "xfs_repair -n: {out}");
    ok("ControllerUnpublish xfs 2", rt.block_on(ctl().controller_unpublish_volume(xunpub.clone())));

    // --- ReadWriteMany: engine and NFS share on the host first asking, every node
    // recorded, the share the publish context names serving the volume's filesystem
    // (libnfs's nfs-ls: this kernel has no NFS client; tests/tests/vm_csi_rwx.rs
    // mounts it from two hosts in the VM), the volume stopping with the last node ---
    let rcap = || mount_cap(Mode::MultiNodeMultiWriter, "");
    let rwx = ok("CreateVolume rwx", rt.block_on(ctl().create_volume(create_req("csi-sanity-rwx", 1 << 26, rcap(), &[("numberOfReplicas", "1")]))));
    let rwx = rwx.volume.expect("volume");
    assert_eq!(m.volume("csi-sanity-rwx")["accessMode"], "rwx");
    let yes = ok("Validate RWX of RWX", rt.block_on(ctl().validate_volume_capabilities(vr("csi-sanity-rwx", rcap()))));
    assert!(yes.confirmed.is_some(), "{yes:?}");
    fails("publish RWX of RWO", rt.block_on(ctl().controller_publish_volume(publish("csi-sanity-v1", "host-a", rcap()))), Code::AlreadyExists);
    let pc = ok("ControllerPublish rwx", rt.block_on(ctl().controller_publish_volume(publish(&rwx.volume_id, "host-a", rcap()))));
    let ep = pc.publish_context.get("shareEndpoint").cloned().unwrap_or_default();
    let port = ep
        .strip_prefix("nfs://127.0.0.1:")
        .and_then(|r| r.strip_suffix("/csi-sanity-rwx"))
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("shareEndpoint {ep:?}: want nfs://127.0.0.1:PORT/csi-sanity-rwx"));
    let ls = format!("nfs-ls 'nfs://127.0.0.1/csi-sanity-rwx?version=4&nfsport={port}'");
    let t0 = std::time::Instant::now();
    loop {
        let (done, out) = sh_try(&ls);
        if done && out.contains("lost+found") {
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "{ls}: the share does not serve the volume's filesystem: {out}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let pc2 = ok("ControllerPublish rwx again", rt.block_on(ctl().controller_publish_volume(publish(&rwx.volume_id, "host-a", rcap()))));
    assert_eq!(pc2.publish_context, pc.publish_context);
    assert_eq!(m.volume("csi-sanity-rwx")["attachedBy"], serde_json::json!(["host-a"]));
    assert_eq!(m.volume("csi-sanity-rwx")["shareClients"], serde_json::json!(["127.0.0.1"]), "the share lets in its host and host-a's address");
    let rstage = base.join("rwx-stage");
    let stage_req = |ep: &str| csi::NodeStageVolumeRequest {
        volume_id: "csi-sanity-rwx".into(),
        staging_target_path: rstage.display().to_string(),
        volume_capability: Some(rcap()),
        publish_context: HashMap::from([("shareEndpoint".to_string(), ep.to_string())]),
        ..Default::default()
    };
    for wrong in ["", "nfs://127.0.0.1:2049/csi-sanity-v1", "http://127.0.0.1/csi-sanity-rwx", "nfs://nohost/csi-sanity-rwx"] {
        let msg = fails("NodeStage rwx, wrong share", rt.block_on(d.node().node_stage_volume(stage_req(wrong))), Code::InvalidArgument);
        assert!(msg.contains("shareEndpoint"), "{msg}");
    }
    let unpub = |node: &str| csi::ControllerUnpublishVolumeRequest { volume_id: "csi-sanity-rwx".into(), node_id: node.into(), ..Default::default() };
    // A node that never published it letting go changes nothing.
    ok("ControllerUnpublish rwx, another node", rt.block_on(ctl().controller_unpublish_volume(unpub("host-b"))));
    assert_eq!(m.volume("csi-sanity-rwx")["state"], "attached");
    ok("ControllerUnpublish rwx", rt.block_on(ctl().controller_unpublish_volume(unpub("host-a"))));
    let v = m.volume("csi-sanity-rwx");
    assert_eq!(v["state"], "detached", "{v}");
    assert_eq!(v["shareEndpoint"], "", "{v}");
    ok("ControllerUnpublish rwx again", rt.block_on(ctl().controller_unpublish_volume(unpub("host-a"))));

    // --- deletes: twice each, and of what never was ---
    let del_snap = |id: &str| csi::DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
    for id in [&s1.snapshot_id, &s1.snapshot_id, &bak.snapshot_id, &bak.snapshot_id, &"snap://csi-nope/none".to_string()] {
        ok("DeleteSnapshot", rt.block_on(ctl().delete_snapshot(del_snap(id))));
    }
    for p in &data_paths {
        assert!(!p.join("volume-snap-snap-1.img").exists(), "the snapshot file is still in {}", p.display());
    }
    let all = ok("ListSnapshots", rt.block_on(ctl().list_snapshots(csi::ListSnapshotsRequest::default())));
    assert!(
        !all.entries.iter().any(|e| e.snapshot.as_ref().is_some_and(|s| s.snapshot_id == s1.snapshot_id || s.snapshot_id == bak.snapshot_id)),
        "{all:?}"
    );
    let del = |id: &str| csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
    fails("DeleteVolume without an id", rt.block_on(ctl().delete_volume(del(""))), Code::InvalidArgument);
    for id in ["csi-sanity-v1", "csi-sanity-v1", "csi-sanity-blk", "csi-sanity-restored", "csi-sanity-xfs", "csi-sanity-rwx", "csi-never-was", "Not A Name"] {
        ok("DeleteVolume", rt.block_on(ctl().delete_volume(del(id))));
    }
    assert!(m.get("/v1/volumes")["data"].as_array().is_some_and(|a| a.is_empty()));
    for p in &data_paths {
        assert!(!p.exists(), "{} is still there", p.display());
    }
    drop(mounts);
}
