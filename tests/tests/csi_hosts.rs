//! The CSI driver across three hosts, each a network namespace of its own with its
//! manager on its own address (token required, as beyond loopback it must be, and
//! HTTPS with certificates from one CA, which the drivers and curl check): a
//! volume's three replicas land one on each host; published on host A, written,
//! unpublished; published on host B (the engine moves there, over the same replicas),
//! the files are there; host C cut off under fio --verify: no I/O error, the volume
//! degraded, and rebuilt once C is back; a backup of it restored into a new volume
//! holds the same bytes.

use longhorn_tests::csi::{csi, fails, mount_cap, ok, Driver};
use longhorn_tests::manager::{start_hosts_tls, Manager};
use longhorn_tests::netns::{Cleanup, Net};
use longhorn_tests::*;
use csi::volume_capability::access_mode::Mode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn replicas_of(m: &Manager, vol: &str) -> Vec<Value> {
    m.get("/v1/replicas")["data"].as_array().into_iter().flatten().filter(|r| r["volume"] == vol).cloned().collect()
}

/// NodeStageVolume at `sa`, then NodePublishVolume at `pa`, on node plugin `d`.
fn stage_and_publish(d: &Driver, vol: &str, cap: &csi::VolumeCapability, sa: &Path, pa: &Path) {
    ok(
        "NodeStage",
        d.rt.block_on(d.node().node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: sa.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })),
    );
    ok(
        "NodePublish",
        d.rt.block_on(d.node().node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: sa.display().to_string(),
            target_path: pa.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })),
    );
}

fn sum(path: &Path) -> String {
    sh(&format!("sha256sum < '{}'", path.display()))
}

#[test]
fn csi_volumes_with_replicas_on_three_hosts() {
    for tool in ["mkfs.ext4", "e2fsck", "mount", "umount", "mountpoint", "fio", "nsenter", "ip", "pkill"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    let t = tempfile::Builder::new().prefix("lh-csi3-").tempdir_in(test_root()).expect("temp dir");
    let base = std::fs::canonicalize(t.path()).expect("the test directory");
    let mut cleanup = Cleanup { mounts: Vec::new(), dir: base.clone() };
    let net = Net::new(&["a", "b", "c"]);
    let store = base.join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    let (token, mans) = start_hosts_tls(&base, &net, &["a", "b", "c"]);
    for m in &mans {
        let (st, v) = m.call("PUT", "/v1/settings/backup-target", Some(&json!({"value": format!("file://{}", store.display())})));
        assert_eq!(st, 200, "{v}");
    }
    let (ma, mb, mc) = (&mans[0], &mans[1], &mans[2]);
    let all = [("host-a", ma.url.as_str()), ("host-b", mb.url.as_str()), ("host-c", mc.url.as_str())];
    let tok = token.to_str().expect("utf8");
    // The managers serve HTTPS (start_hosts_tls); the drivers trust their CA only.
    let ca_file = base.join("tls/ca.pem");
    let ca = ca_file.to_str().expect("utf8");
    let ctl = Driver::start_in(&base, Some((&net, "a")), "controller", "host-a", &all, &["--mode", "controller", "--token-file", tok, "--manager-ca", ca]);
    let node_a = Driver::start_in(&base, Some((&net, "a")), "node-a", "host-a", &all[..1], &["--mode", "node", "--token-file", tok, "--manager-ca", ca]);
    let node_b = Driver::start_in(&base, Some((&net, "b")), "node-b", "host-b", &all[1..2], &["--mode", "node", "--token-file", tok, "--manager-ca", ca]);
    let rt = &ctl.rt;
    let snw = || mount_cap(Mode::SingleNodeWriter, "ext4");
    let create = |name: &str, n: &str, src: Option<String>| csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 128 << 20, limit_bytes: 0 }),
        volume_capabilities: vec![snw()],
        parameters: HashMap::from([("numberOfReplicas".to_string(), n.to_string()), ("staleReplicaTimeout".to_string(), "30".to_string())]),
        volume_content_source: src.map(|id| csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: id })),
        }),
        ..Default::default()
    };

    // --- anti-affinity: three hosts take three replicas, one each; four are refused ---
    fails("4 replicas on 3 hosts", rt.block_on(ctl.controller().create_volume(create("pvc-four", "4", None))), Code::ResourceExhausted);
    for m in &mans {
        assert!(replicas_of(m, "pvc-four").is_empty(), "a refused volume left a replica on {}", m.url);
    }
    let vol = "pvc-hosts-1";
    let v = ok("CreateVolume", rt.block_on(ctl.controller().create_volume(create(vol, "3", None)))).volume.expect("volume");
    assert_eq!(v.volume_id, vol);
    let again = ok("CreateVolume again", rt.block_on(ctl.controller().create_volume(create(vol, "3", None)))).volume.expect("volume");
    assert_eq!(again.volume_id, vol);
    let mut addrs = Vec::new();
    for (i, m) in mans.iter().enumerate() {
        let rs = replicas_of(m, vol);
        assert_eq!(rs.len(), 1, "host {i} keeps {} replicas of {vol}: {rs:?}", rs.len());
        let a = rs[0]["address"].as_str().expect("address").to_string();
        assert!(a.starts_with(&format!("{}:", net.addr(["a", "b", "c"][i]))), "replica on host {i} listens on {a}");
        addrs.push(a);
    }
    let owner_view = ma.volume(vol);
    let mut listed: Vec<String> = owner_view["replicas"].as_array().into_iter().flatten().filter_map(|r| r["address"].as_str()).map(String::from).collect();
    listed.sort();
    let mut want = addrs.clone();
    want.sort();
    assert_eq!(listed, want, "{owner_view}");

    // --- published on host A: staged, written ---
    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(snw()),
        ..Default::default()
    };
    let unpublish = |node: &str| csi::ControllerUnpublishVolumeRequest { volume_id: vol.into(), node_id: node.into(), ..Default::default() };
    let stage_at = |p: &Path| csi::NodeStageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: p.display().to_string(),
        volume_capability: Some(snw()),
        ..Default::default()
    };
    let pub_at = |staging: &Path, p: &Path| csi::NodePublishVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.display().to_string(),
        target_path: p.display().to_string(),
        volume_capability: Some(snw()),
        ..Default::default()
    };
    let (sa, pa) = (base.join("a/staging"), base.join("a/pod"));
    let (sb, pb) = (base.join("b/staging"), base.join("b/pod"));
    cleanup.mounts.extend([sa.clone(), pa.clone(), sb.clone(), pb.clone()]);
    ok("ControllerPublish A", rt.block_on(ctl.controller().controller_publish_volume(publish("host-a"))));
    ma.wait_volume(vol, 60, "healthy with 3 replicas", |v| v["robustness"] == "healthy");
    ok("NodeStage A", node_a.rt.block_on(node_a.node().node_stage_volume(stage_at(&sa))));
    ok("NodePublish A", node_a.rt.block_on(node_a.node().node_publish_volume(pub_at(&sa, &pa))));
    sh(&format!("head -c 8000000 /dev/urandom > '{0}/data.bin' && echo written-on-a > '{0}/hello.txt' && sync", pa.display()));
    let data_sum = sum(&pa.join("data.bin"));
    // Not on another node while published here.
    fails("ControllerPublish B while on A", rt.block_on(ctl.controller().controller_publish_volume(publish("host-b"))), Code::FailedPrecondition);
    ok("NodeUnpublish A", node_a.rt.block_on(node_a.node().node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: pa.display().to_string() })));
    ok("NodeUnstage A", node_a.rt.block_on(node_a.node().node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: sa.display().to_string() })));
    ok("ControllerUnpublish A", rt.block_on(ctl.controller().controller_unpublish_volume(unpublish("host-a"))));

    // --- published on host B: the engine moves there, the files are there ---
    ok("ControllerPublish B", rt.block_on(ctl.controller().controller_publish_volume(publish("host-b"))));
    assert_eq!(ma.call("GET", &format!("/v1/volumes/{vol}"), None).0, 404, "host A still records the volume");
    mb.wait_volume(vol, 60, "attached and healthy on B", |v| v["state"] == "attached" && v["robustness"] == "healthy");
    ok("NodeStage B", node_b.rt.block_on(node_b.node().node_stage_volume(stage_at(&sb))));
    ok("NodePublish B", node_b.rt.block_on(node_b.node().node_publish_volume(pub_at(&sb, &pb))));
    assert_eq!(sh(&format!("cat '{}/hello.txt'", pb.display())).trim(), "written-on-a");
    assert_eq!(sum(&pb.join("data.bin")), data_sum);

    // --- host C cut off under fio --verify: no error, degraded, then rebuilt ---
    let dir = pb.display().to_string();
    let fio_job = std::thread::spawn(move || {
        fio(&format!(
            "--name=verify --directory='{dir}' --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=24M \
             --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_backlog=512 --time_based --runtime=30"
        ))
    });
    std::thread::sleep(Duration::from_secs(3));
    net.cut("c");
    wait_for("the volume degraded with host C cut off", Duration::from_secs(40), || mb.volume(vol)["robustness"] == "degraded");
    assert!(!fio_job.is_finished(), "fio ended before the fault was seen");
    std::thread::sleep(Duration::from_secs(2));
    net.heal("c");
    wait_for("the volume healthy again after host C is back", Duration::from_secs(120), || mb.volume(vol)["robustness"] == "healthy");
    let (ran, errors, out) = fio_job.join().expect("fio thread");
    assert!(ran && errors == 0, "fio reported errors with host C cut off: {out}");
    let modes: Vec<Value> = mb.volume(vol)["replicas"].as_array().cloned().unwrap_or_default();
    assert!(modes.iter().all(|r| r["mode"] == "RW") && modes.len() == 3, "{modes:?}");

    // --- a backup of it, restored into a new volume, holds the same bytes ---
    let snap = csi::CreateSnapshotRequest {
        source_volume_id: vol.into(),
        name: "bak-hosts".into(),
        parameters: HashMap::from([("type".to_string(), "bak".to_string())]),
        ..Default::default()
    };
    let mut bak = ok("CreateSnapshot bak", rt.block_on(ctl.controller().create_snapshot(snap.clone()))).snapshot.expect("snapshot");
    let t0 = Instant::now();
    while !bak.ready_to_use {
        assert!(t0.elapsed() < Duration::from_secs(120), "the backup is not ready in 120 s: {bak:?}");
        std::thread::sleep(Duration::from_millis(500));
        bak = ok("CreateSnapshot bak again", rt.block_on(ctl.controller().create_snapshot(snap.clone()))).snapshot.expect("snapshot");
    }
    ok("NodeUnpublish B", node_b.rt.block_on(node_b.node().node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: pb.display().to_string() })));
    ok("NodeUnstage B", node_b.rt.block_on(node_b.node().node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: sb.display().to_string() })));
    let (clean, out) = sh_try(&format!("e2fsck -fn /dev/longhorn/{vol}"));
    assert!(clean, "e2fsck after the fault: {out}");
    ok("ControllerUnpublish B", rt.block_on(ctl.controller().controller_unpublish_volume(unpublish("host-b"))));

    let restored = "pvc-hosts-restored";
    let rv = ok("CreateVolume from the backup", rt.block_on(ctl.controller().create_volume(create(restored, "1", Some(bak.snapshot_id.clone())))))
        .volume
        .expect("volume");
    let host = rv.accessible_topology[0].segments.get("topology.longhorn.io/host").cloned().expect("topology");
    assert_eq!(host, "host-a", "the restore went to {host}");
    ma.wait_volume(restored, 120, "restored", |v| v["state"] == "detached");
    let (sr, pr) = (base.join("a/staging-r"), base.join("a/pod-r"));
    cleanup.mounts.extend([sr.clone(), pr.clone()]);
    ok(
        "ControllerPublish restored",
        rt.block_on(ctl.controller().controller_publish_volume(csi::ControllerPublishVolumeRequest { volume_id: restored.into(), ..publish("host-a") })),
    );
    ok("NodeStage restored", node_a.rt.block_on(node_a.node().node_stage_volume(csi::NodeStageVolumeRequest { volume_id: restored.into(), ..stage_at(&sr) })));
    ok("NodePublish restored", node_a.rt.block_on(node_a.node().node_publish_volume(csi::NodePublishVolumeRequest { volume_id: restored.into(), ..pub_at(&sr, &pr) })));
    assert_eq!(sh(&format!("cat '{}/hello.txt'", pr.display())).trim(), "written-on-a");
    assert_eq!(sum(&pr.join("data.bin")), data_sum);
    ok("NodeUnpublish restored", node_a.rt.block_on(node_a.node().node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: restored.into(), target_path: pr.display().to_string() })));
    ok("NodeUnstage restored", node_a.rt.block_on(node_a.node().node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: restored.into(), staging_target_path: sr.display().to_string() })));
    ok(
        "ControllerUnpublish restored",
        rt.block_on(ctl.controller().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest { volume_id: restored.into(), ..unpublish("host-a") })),
    );

    // --- expanded while unpublished: every host grows its replica, the filesystem
    // grows when staged on B, the files kept ---
    let grow = csi::ControllerExpandVolumeRequest {
        volume_id: vol.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 192 << 20, limit_bytes: 0 }),
        volume_capability: Some(snw()),
        ..Default::default()
    };
    let ex = ok("ControllerExpand", rt.block_on(ctl.controller().controller_expand_volume(grow.clone())));
    assert!(ex.capacity_bytes == 192 << 20 && ex.node_expansion_required, "{ex:?}");
    ok("ControllerExpand again", rt.block_on(ctl.controller().controller_expand_volume(grow)));
    for m in &mans {
        let rs = replicas_of(m, vol);
        assert!(rs.iter().all(|r| r["size"] == (192u64 << 20).to_string().as_str() && r["running"] == true), "{rs:?}");
    }
    ok("ControllerPublish B again", rt.block_on(ctl.controller().controller_publish_volume(publish("host-b"))));
    ok("NodeStage B again", node_b.rt.block_on(node_b.node().node_stage_volume(stage_at(&sb))));
    let size = sh(&format!("df -B1 --output=size '{}' | tail -1", sb.display())).trim().parse::<u64>().expect("df");
    assert!(size > 140 << 20, "the filesystem did not grow with the volume (128 MiB before): {size} bytes");
    assert_eq!(sum(&sb.join("data.bin")), data_sum);
    ok("NodeUnstage B again", node_b.rt.block_on(node_b.node().node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: sb.display().to_string() })));
    ok("ControllerUnpublish B again", rt.block_on(ctl.controller().controller_unpublish_volume(unpublish("host-b"))));

    // --- deletes take every host's replicas with them ---
    ok("DeleteSnapshot", rt.block_on(ctl.controller().delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: bak.snapshot_id.clone(), ..Default::default() })));
    for id in [vol, vol, restored] {
        ok("DeleteVolume", rt.block_on(ctl.controller().delete_volume(csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() })));
    }
    for m in &mans {
        assert!(replicas_of(m, vol).is_empty(), "{} keeps a replica of the deleted volume", m.url);
        assert!(m.get("/v1/volumes")["data"].as_array().is_some_and(|a| a.is_empty()), "{} keeps a volume", m.url);
    }
    drop(cleanup);
}

/// A host lost for longer than the volume's staleReplicaTimeout: the controller builds
/// its replica afresh on a fourth host (none of the volume's), the engine rebuilds it
/// while a writer carries on, and the lost host's old replica is deleted once it is back.
#[test]
fn a_lost_hosts_replica_is_rebuilt_on_another_host_after_the_stale_timeout() {
    for tool in ["mkfs.ext4", "e2fsck", "mount", "umount", "mountpoint", "nsenter", "ip", "pkill"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    let t = tempfile::Builder::new().prefix("lh-csi4-").tempdir_in(test_root()).expect("temp dir");
    let base = std::fs::canonicalize(t.path()).expect("the test directory");
    let mut cleanup = Cleanup { mounts: Vec::new(), dir: base.clone() };
    let net = Net::new(&["a", "b", "c", "d"]);
    let (token, mans) = start_hosts_tls(&base, &net, &["a", "b", "c", "d"]);
    let (ma, mc, md) = (&mans[0], &mans[2], &mans[3]);
    let all: Vec<(String, &str)> = ["a", "b", "c", "d"].iter().zip(&mans).map(|(h, m)| (format!("host-{h}"), m.url.as_str())).collect();
    let all: Vec<(&str, &str)> = all.iter().map(|(h, u)| (h.as_str(), *u)).collect();
    let tok = token.to_str().expect("utf8");
    // The managers serve HTTPS (start_hosts_tls); the drivers trust their CA only.
    let ca_file = base.join("tls/ca.pem");
    let ca = ca_file.to_str().expect("utf8");
    let ctl = Driver::start_in(&base, Some((&net, "a")), "controller", "host-a", &all, &["--mode", "controller", "--token-file", tok, "--manager-ca", ca]);
    let node_a = Driver::start_in(&base, Some((&net, "a")), "node-a", "host-a", &all[..1], &["--mode", "node", "--token-file", tok, "--manager-ca", ca]);
    let rt = &ctl.rt;
    let vol = "pvc-stale-1";
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    ok(
        "CreateVolume",
        rt.block_on(ctl.controller().create_volume(csi::CreateVolumeRequest {
            name: vol.into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 64 << 20, limit_bytes: 0 }),
            volume_capabilities: vec![cap.clone()],
            // One minute: Longhorn's unit, and its smallest.
            parameters: HashMap::from([("numberOfReplicas".to_string(), "3".to_string()), ("staleReplicaTimeout".to_string(), "1".to_string())]),
            ..Default::default()
        })),
    );
    let holders = || -> Vec<usize> { mans.iter().enumerate().filter(|(_, m)| !replicas_of(m, vol).is_empty()).map(|(i, _)| i).collect() };
    assert_eq!(holders(), [0, 1, 2], "the replicas are not on hosts a, b, c");
    let old_c = replicas_of(mc, vol)[0]["address"].as_str().expect("address").to_string();
    ok(
        "ControllerPublish",
        rt.block_on(ctl.controller().controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: "host-a".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })),
    );
    ma.wait_volume(vol, 60, "healthy", |v| v["robustness"] == "healthy");
    let (sa, pa) = (base.join("staging"), base.join("pod"));
    cleanup.mounts.extend([sa.clone(), pa.clone()]);
    stage_and_publish(&node_a, vol, &cap, &sa, &pa);
    sh(&format!("head -c 6000000 /dev/urandom > '{}/data.bin' && sync", pa.display()));
    let data_sum = sum(&pa.join("data.bin"));

    // A writer appends a numbered, synced line twice a second for the whole story.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, log) = (stop.clone(), pa.join("log.txt"));
    let writer = std::thread::spawn(move || {
        let mut n = 0u32;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let (ok, out) = sh_try(&format!("echo line-{n} >> '{}' && sync '{}'", log.display(), log.display()));
            assert!(ok, "write {n} failed: {out}");
            std::thread::sleep(Duration::from_millis(500));
        }
        n
    });
    std::thread::sleep(Duration::from_secs(2));
    net.cut("c");
    wait_for("the volume degraded with host C cut off", Duration::from_secs(40), || ma.volume(vol)["robustness"] == "degraded");
    // Before the stale timeout the replica waits for its host; after it, host D.
    let t0 = Instant::now();
    while replicas_of(md, vol).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(150), "no replica on host D within 150 s; controller log:\n{}\nvolume: {}", ctl.log_text(), ma.volume(vol));
        std::thread::sleep(Duration::from_millis(500));
    }
    let new_d = replicas_of(md, vol)[0]["address"].as_str().expect("address").to_string();
    wait_for("the volume healthy again, its replicas on a, b, d", Duration::from_secs(120), || {
        let v = ma.volume(vol);
        v["robustness"] == "healthy" && v["replicaAddresses"].as_array().is_some_and(|a| a.iter().any(|x| x == new_d.as_str()) && !a.iter().any(|x| x == old_c.as_str()))
    });
    assert!(!writer.is_finished(), "the writer stopped");
    net.heal("c");
    wait_for("host C's old replica deleted once it is back", Duration::from_secs(60), || replicas_of(mc, vol).is_empty());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = writer.join().expect("the writer");
    let lines = std::fs::read_to_string(pa.join("log.txt")).expect("the log");
    let want: Vec<String> = (1..=n).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines.lines().collect::<Vec<_>>(), want.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(sum(&pa.join("data.bin")), data_sum);
    ok("NodeUnpublish", node_a.rt.block_on(node_a.node().node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: pa.display().to_string() })));
    ok("NodeUnstage", node_a.rt.block_on(node_a.node().node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: sa.display().to_string() })));
    let (clean, out) = sh_try(&format!("e2fsck -fn /dev/longhorn/{vol}"));
    assert!(clean, "e2fsck after the rebuild on host D: {out}");
    ok("ControllerUnpublish", rt.block_on(ctl.controller().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest { volume_id: vol.into(), node_id: "host-a".into(), ..Default::default() })));
    ok("DeleteVolume", rt.block_on(ctl.controller().delete_volume(csi::DeleteVolumeRequest { volume_id: vol.into(), ..Default::default() })));
    assert!(holders().is_empty(), "replicas left after the delete: {:?}", holders());
    drop(cleanup);
}

/// The host serving a volume is lost (its network cut, every process on it killed):
/// Kubernetes' force-detach (ControllerUnpublish for that node) succeeds once the host
/// has not answered for --failover-after, and ControllerPublish on another node serves
/// the volume there from the record copy its replicas' hosts keep, with the files
/// written before the loss. When the lost host's manager comes back, its old record of
/// the volume is removed and its replica is rebuilt into the volume.
#[test]
fn a_lost_engine_hosts_volume_is_served_from_another_host() {
    for tool in ["mkfs.ext4", "e2fsck", "mount", "umount", "mountpoint", "nsenter", "ip", "pkill"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    let t = tempfile::Builder::new().prefix("lh-csi5-").tempdir_in(test_root()).expect("temp dir");
    let base = std::fs::canonicalize(t.path()).expect("the test directory");
    let mut cleanup = Cleanup { mounts: Vec::new(), dir: base.clone() };
    let net = Net::new(&["a", "b", "c"]);
    let (token, mut mans) = start_hosts_tls(&base, &net, &["a", "b", "c"]);
    let all: Vec<(String, String)> = ["a", "b", "c"].iter().zip(&mans).map(|(h, m)| (format!("host-{h}"), m.url.clone())).collect();
    let all: Vec<(&str, &str)> = all.iter().map(|(h, u)| (h.as_str(), u.as_str())).collect();
    let tok = token.to_str().expect("utf8");
    let ca_file = base.join("tls/ca.pem");
    let ca = ca_file.to_str().expect("utf8");
    // The controller must outlive host A: it runs on C.
    let ctl = Driver::start_in(&base, Some((&net, "c")), "controller", "host-c", &all, &["--mode", "controller", "--token-file", tok, "--manager-ca", ca, "--failover-after", "5"]);
    let node = |h: &str, i: usize| Driver::start_in(&base, Some((&net, h)), &format!("node-{h}"), &format!("host-{h}"), &all[i..i + 1], &["--mode", "node", "--token-file", tok, "--manager-ca", ca]);
    let (node_a, node_b) = (node("a", 0), node("b", 1));
    let rt = &ctl.rt;
    let vol = "pvc-lost-1";
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    ok(
        "CreateVolume",
        rt.block_on(ctl.controller().create_volume(csi::CreateVolumeRequest {
            name: vol.into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 64 << 20, limit_bytes: 0 }),
            volume_capabilities: vec![cap.clone()],
            parameters: HashMap::from([("numberOfReplicas".to_string(), "3".to_string())]),
            ..Default::default()
        })),
    );
    let publish = |n: &str| {
        rt.block_on(ctl.controller().controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: n.into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }))
    };
    ok("ControllerPublish on A", publish("host-a"));
    mans[0].wait_volume(vol, 60, "healthy on A", |v| v["robustness"] == "healthy");
    let (sa, pa, sb, pb) = (base.join("staging-a"), base.join("pod-a"), base.join("staging-b"), base.join("pod-b"));
    cleanup.mounts.extend([sa.clone(), pa.clone(), sb.clone(), pb.clone()]);
    stage_and_publish(&node_a, vol, &cap, &sa, &pa);
    sh(&format!("head -c 6000000 /dev/urandom > '{}/data.bin' && sync", pa.display()));
    let data_sum = sum(&pa.join("data.bin"));
    // The replicas' hosts keep a copy of the volume's record, naming A.
    wait_for("the record copies on B and C", Duration::from_secs(30), || {
        [&mans[1], &mans[2]].iter().all(|m| replicas_of(m, vol).iter().any(|r| r["record"]["owner"] == "host-a"))
    });

    // Host A is lost.
    net.cut("a");
    sh(&format!("ip netns pids {} | xargs -r kill -9", net.ns("a")));
    let _ = sh_try(&format!("pkill -9 -f -- '{}/host-a/'", base.display()));
    // Kubernetes force-detaches from the lost node; then publishes on B.
    wait_for("ControllerUnpublish from the lost host A", Duration::from_secs(60), || {
        rt.block_on(ctl.controller().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.into(),
            node_id: "host-a".into(),
            ..Default::default()
        }))
        .is_ok()
    });
    let t0 = Instant::now();
    loop {
        match publish("host-b") {
            Ok(_) => break,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(120), "ControllerPublish on B after A was lost: {e:?}\ncontroller log:\n{}", ctl.log_text());
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    let v = mans[1].volume(vol);
    assert_eq!(v["state"], "attached", "{v}");
    assert!(v["generation"].as_u64().is_some_and(|g| g >= 1), "the taken-over record is a generation up: {v}");
    assert!(ctl.log_text().contains("took over the volume of a lost host"), "{}", ctl.log_text());
    stage_and_publish(&node_b, vol, &cap, &sb, &pb);
    assert_eq!(sum(&pb.join("data.bin")), data_sum, "the file written on A before the loss");
    sh(&format!("head -c 3000000 /dev/urandom > '{}/more.bin' && sync", pb.display()));
    let more_sum = sum(&pb.join("more.bin"));

    // Host A comes back: its manager with the old record, which goes.
    let _ = sh_try(&format!("umount -l '{}'; umount -l '{}'", pa.display(), sa.display()));
    net.heal("a");
    let certs = longhorn_tests::manager::Certs { ca: base.join("tls/ca.pem"), cert: base.join("tls/cert.pem"), key: base.join("tls/key.pem") };
    let old = std::mem::replace(&mut mans[0], Manager::start_on_host(&base.join("host-a"), &net, "a", &token, Some(&certs)));
    std::mem::forget(old);
    wait_for("host A's old record of the volume removed", Duration::from_secs(90), || mans[0].call("GET", &format!("/v1/volumes/{vol}"), None).0 == 404);
    wait_for("the volume healthy on B, A's replica rebuilt", Duration::from_secs(120), || mans[1].volume(vol)["robustness"] == "healthy");
    assert_eq!(sum(&pb.join("data.bin")), data_sum);
    assert_eq!(sum(&pb.join("more.bin")), more_sum);
    ok("NodeUnpublish", node_b.rt.block_on(node_b.node().node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: pb.display().to_string() })));
    ok("NodeUnstage", node_b.rt.block_on(node_b.node().node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: sb.display().to_string() })));
    let (clean, out) = sh_try(&format!("e2fsck -fn /dev/longhorn/{vol}"));
    assert!(clean, "e2fsck after the take-over: {out}");
    ok("ControllerUnpublish", rt.block_on(ctl.controller().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest { volume_id: vol.into(), node_id: "host-b".into(), ..Default::default() })));
    ok("DeleteVolume", rt.block_on(ctl.controller().delete_volume(csi::DeleteVolumeRequest { volume_id: vol.into(), ..Default::default() })));
    drop(cleanup);
}
