//! ReadWriteMany through the CSI driver across hosts, with the kernel's NFS client:
//! the host kernel has none, so the test VM (tests/vm/, Debian's 6.12 kernel under
//! qemu TCG) runs this same test binary's `inside_the_vm` (tests/vm/rust_test.sh).
//! There, two hosts are network namespaces of their own, each with its manager and
//! node plugin, and a controller drives both: a MULTI_NODE_MULTI_WRITER volume with a
//! replica on each host, published on A (its engine and NFS share start there) and on
//! B (the same share, mounted over B's link), the seed's writer on A appending while
//! the reader on B reads whole lines in order, B's own line read back on A, B let go
//! while A keeps it, then A; published again on B first, the volume moves there and
//! holds every line. The share lets in only the nodes it is published to: a third
//! host on the same network (no node of the volume) is refused a mount, and so is B
//! once it has let go.
//!
//! If the VM cannot be set up the outer test fails and says why: it never passes
//! silently. `inside_the_vm` is ignored outside the VM (it needs an NFS client).

use longhorn_tests::csi::{csi, mount_cap, ok, Driver};
use longhorn_tests::manager::start_hosts;
use longhorn_tests::netns::{Cleanup, Net, Unmounts};
use longhorn_tests::*;
use csi::volume_capability::access_mode::Mode;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const VM_TIMEOUT: Duration = Duration::from_secs(12 * 60);
const STEPS: &[&str] = &[
    "hosts", "create", "publish_a", "publish_b", "over_the_network", "outsider_refused", "writer_reader", "b_writes_a_reads", "stats", "b_lets_go", "b_refused", "a_lets_go",
    "moved_to_b", "deleted",
];
const LINES: usize = 40;
const FINAL: &str = "longhorn rwx access mode";

#[test]
fn vm_csi_rwx_on_two_hosts() {
    let test_bin = stage_for_vm(&std::env::current_exe().expect("this test binary"));
    let args: Vec<String> = [test_bin.display().to_string(), "inside_the_vm".into()]
        .into_iter()
        .chain(["ext4", "nbd", "loop", "nfsv4", "veth", "bridge"].map(String::from))
        .collect();
    let run = vm::run("rust_test.sh", &args, "vm-csi-rwx-console.log", VM_TIMEOUT);
    let _ = std::fs::remove_file(&test_bin);
    let ctx = &run.ctx;
    eprintln!("VM CSI RWX scenario, boot to poweroff {:?}:\n{}", run.elapsed, run.steps().join("\n"));
    assert!(!run.timed_out, "the VM did not finish within {VM_TIMEOUT:?}; {ctx}");
    let mut failed = Vec::new();
    for s in ["vm.boot", "vm.modules"].into_iter().map(String::from).chain(STEPS.iter().map(|s| format!("rwx.{s}"))).chain(["test.exit".into()]) {
        if run.status(&s).as_deref() != Some("OK") {
            failed.push(format!("{s}: {}", run.status(&s).unwrap_or_else(|| "missing".into())));
        }
    }
    assert!(run.console.contains("VM-DONE"), "the scenario did not finish; {ctx}");
    assert!(failed.is_empty(), "VM steps not OK: {failed:?}; {ctx}");
}

fn step(name: &str, detail: &str) {
    println!("STEP rwx.{name} OK {detail}");
    let _ = std::io::stdout().flush();
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> Result<(), String>) {
    let t = Instant::now();
    loop {
        match done() {
            Ok(()) => return,
            Err(e) if t.elapsed() > limit => panic!("{what}: not within {limit:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// One reader's view of the file: whole lines, the writer's numbered from 0 in order,
/// then at most the final line. The number of the writer's lines seen, or what is wrong.
fn check_view(text: &str) -> Result<usize, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(format!("torn last line: {:?}", text.lines().last()));
    }
    let mut n = 0;
    let mut fin = false;
    for (i, line) in text.lines().enumerate() {
        if fin {
            return Err(format!("line {i} after the final line: {line:?}"));
        }
        if line == FINAL {
            fin = true;
            continue;
        }
        if !line.starts_with(&format!("seq={n:05} ")) {
            return Err(format!("line {i} is {line:?}, expected seq={n:05}"));
        }
        n += 1;
    }
    Ok(n)
}

/// The NFS mount at `p` (fstype, source).
fn nfs_mount(p: &Path) -> Option<(String, String)> {
    mount_table().into_iter().rev().find(|m| m.point == p && m.fstype.starts_with("nfs")).map(|m| (m.fstype, m.source))
}

/// Mounts the share `ep` (nfs://IP:PORT/VOL) at `dir` from `host`'s network with the
/// kernel's client, once (no mount.nfs retries); unmounts it again if that worked.
/// Err(what the kernel said) when refused.
fn try_mount(net: &Net, host: &str, ep: &str, dir: &Path) -> Result<(), String> {
    let rest = ep.strip_prefix("nfs://").unwrap_or(ep);
    let (addr, vol) = rest.split_once('/').unwrap_or((rest, ""));
    let (ip, port) = addr.rsplit_once(':').unwrap_or((addr, "2049"));
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let cmd = format!(
        "timeout 60 nsenter --net=/var/run/netns/{} -- mount -i -t nfs4 -o vers=4.1,port={port},addr={ip},soft,timeo=50,retrans=1 {ip}:/{vol} {} 2>&1",
        net.ns(host),
        dir.display()
    );
    let (mounted, out) = sh_try(&cmd);
    if mounted {
        let _ = sh_try(&format!("umount -l {}", dir.display()));
        return Ok(());
    }
    Err(out.trim().to_string())
}

#[test]
#[ignore = "runs inside the test VM (vm_csi_rwx_on_two_hosts): it needs the kernel's NFS client"]
fn inside_the_vm() {
    assert!(std::env::var("LONGHORN_IN_VM").is_ok(), "run by vm_csi_rwx_on_two_hosts inside the test VM, not directly");
    let t = tempfile::Builder::new().prefix("lh-rwx-").tempdir_in(test_root()).expect("temp dir");
    let base = std::fs::canonicalize(t.path()).expect("the test directory");
    let cleanup = Cleanup { mounts: Vec::new(), dir: base.clone() };
    // c: a host on the same network that the volume is never published to.
    let net = Net::new(&["a", "b", "c"]);
    let (token, mans) = start_hosts(&base, &net, &["a", "b"]);
    let (ma, mb) = (&mans[0], &mans[1]);
    let all = [("host-a", ma.url.as_str()), ("host-b", mb.url.as_str())];
    let tok = token.to_str().expect("utf8");
    let ctl = Driver::start_in(&base, Some((&net, "a")), "controller", "host-a", &all, &["--mode", "controller", "--token-file", tok]);
    let node_a = Driver::start_in(&base, Some((&net, "a")), "node-a", "host-a", &all[..1], &["--mode", "node", "--token-file", tok]);
    let node_b = Driver::start_in(&base, Some((&net, "b")), "node-b", "host-b", &all[1..], &["--mode", "node", "--token-file", tok]);
    let _logs = LogsOnPanic(base.clone());
    step("hosts", &format!("a={} b={}", net.addr("a"), net.addr("b")));

    let vol = "pvc-rwx";
    let rwx = || mount_cap(Mode::MultiNodeMultiWriter, "ext4");
    let rt = &ctl.rt;
    let create = csi::CreateVolumeRequest {
        name: vol.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 64 << 20, limit_bytes: 0 }),
        volume_capabilities: vec![rwx()],
        parameters: HashMap::from([("numberOfReplicas".to_string(), "2".to_string())]),
        ..Default::default()
    };
    ok("CreateVolume", rt.block_on(ctl.controller().create_volume(create)));
    for m in [ma, mb] {
        let n = m.get("/v1/replicas")["data"].as_array().into_iter().flatten().filter(|r| r["volume"] == vol).count();
        assert_eq!(n, 1, "{} keeps {n} replicas of {vol}", m.url);
    }
    step("create", "one replica on each host");

    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(rwx()),
        ..Default::default()
    };
    let unpublish = |node: &str| csi::ControllerUnpublishVolumeRequest { volume_id: vol.into(), node_id: node.into(), ..Default::default() };
    let stage = |p: &Path, ctx: &HashMap<String, String>| csi::NodeStageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: p.display().to_string(),
        volume_capability: Some(rwx()),
        publish_context: ctx.clone(),
        ..Default::default()
    };
    let publish_at = |staging: &Path, p: &Path, ctx: &HashMap<String, String>| csi::NodePublishVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.display().to_string(),
        target_path: p.display().to_string(),
        volume_capability: Some(rwx()),
        publish_context: ctx.clone(),
        ..Default::default()
    };
    let let_go = |d: &Driver, staging: &Path, p: &Path| {
        let np = csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: p.display().to_string() };
        ok("NodeUnpublish", d.rt.block_on(d.node().node_unpublish_volume(np)));
        let nu = csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: staging.display().to_string() };
        ok("NodeUnstage", d.rt.block_on(d.node().node_unstage_volume(nu)));
    };
    let (sa, pa) = (base.join("a/staging"), base.join("a/pod"));
    let (sb, pb) = (base.join("b/staging"), base.join("b/pod"));
    let _unmounts = Unmounts(vec![sa.clone(), pa.clone(), sb.clone(), pb.clone()]);

    // --- A: the engine and the share start there; A mounts its own share ---
    let ctx_a = ok("ControllerPublish A", rt.block_on(ctl.controller().controller_publish_volume(publish("host-a")))).publish_context;
    let ep = ctx_a.get("shareEndpoint").cloned().unwrap_or_default();
    assert!(ep.starts_with(&format!("nfs://{}:", net.addr("a"))) && ep.ends_with("/pvc-rwx"), "shareEndpoint {ep:?}");
    ok("NodeStage A", node_a.rt.block_on(node_a.node().node_stage_volume(stage(&sa, &ctx_a))));
    ok("NodePublish A", node_a.rt.block_on(node_a.node().node_publish_volume(publish_at(&sa, &pa, &ctx_a))));
    step("publish_a", &ep);

    // --- B: the same share, the engine stays on A ---
    let ctx_b = ok("ControllerPublish B", rt.block_on(ctl.controller().controller_publish_volume(publish("host-b")))).publish_context;
    assert_eq!(ctx_b, ctx_a, "B is given another share than A");
    ok("NodeStage B", node_b.rt.block_on(node_b.node().node_stage_volume(stage(&sb, &ctx_b))));
    ok("NodePublish B", node_b.rt.block_on(node_b.node().node_publish_volume(publish_at(&sb, &pb, &ctx_b))));
    let v = ma.volume(vol);
    assert_eq!(v["attachedBy"], serde_json::json!(["host-a", "host-b"]), "{v}");
    assert_eq!(mb.call("GET", &format!("/v1/volumes/{vol}"), None).0, 404, "host B records the volume too");
    step("publish_b", "attachedBy host-a, host-b");
    let (fstype, source) = nfs_mount(&sb).expect("an NFS mount at B's staging path");
    assert_eq!(source, format!("{}:/{vol}", net.addr("a")), "B mounts {source}");
    step("over_the_network", &format!("B: {fstype} {source}"));
    let want = serde_json::json!([net.addr("a"), net.addr("b")]);
    assert_eq!(ma.volume(vol)["shareClients"], want, "the share lets in A and B only");
    // The same mount from a listed host works: what refuses c is the list.
    try_mount(&net, "b", &ep, &base.join("b/probe")).unwrap_or_else(|e| panic!("B, a listed host, cannot mount {ep} the same way: {e}"));
    match try_mount(&net, "c", &ep, &base.join("c/mnt")) {
        Ok(()) => panic!("host c ({}) mounted {ep}, a share it was never published to", net.addr("c")),
        Err(why) => step("outsider_refused", &format!("c ({}): {why}", net.addr("c"))),
    }

    // --- the seed's writer on A, its reader on B ---
    let (fa, fb) = (pa.join("index.html"), pb.join("index.html"));
    std::fs::write(&fa, b"").expect("creating index.html on A");
    let fa2 = fa.clone();
    let writer = std::thread::spawn(move || {
        for n in 0..LINES {
            let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
            let mut f = std::fs::OpenOptions::new().append(true).open(&fa2).map_err(|e| format!("line {n}: {e}"))?;
            f.write_all(format!("seq={n:05} ts={ts:.6}\n").as_bytes()).map_err(|e| format!("line {n}: {e}"))?;
            drop(f);
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok::<(), String>(())
    });
    let mut reads = 0;
    let mut seen = 0;
    while !writer.is_finished() {
        let text = std::fs::read_to_string(&fb).unwrap_or_default();
        let n = check_view(&text).unwrap_or_else(|e| panic!("B's view of index.html while A writes: {e}"));
        assert!(n >= seen, "B saw {seen} lines, then {n}");
        seen = n;
        reads += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().expect("writer thread").unwrap_or_else(|e| panic!("the writer on A failed: {e}"));
    wait_for("B sees every line A wrote", Duration::from_secs(30), || match check_view(&std::fs::read_to_string(&fb).unwrap_or_default()) {
        Ok(n) if n == LINES => Ok(()),
        Ok(n) => Err(format!("{n} lines")),
        Err(e) => panic!("{e}"),
    });
    step("writer_reader", &format!("{LINES} lines; B read {reads} times, saw {seen} while A wrote"));
    let mut f = std::fs::OpenOptions::new().append(true).open(&fb).expect("opening index.html on B");
    f.write_all(format!("{FINAL}\n").as_bytes()).expect("appending on B");
    drop(f);
    wait_for("A reads B's line", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&fa).unwrap_or_default();
        check_view(&text)?;
        if text.ends_with(&format!("{FINAL}\n")) { Ok(()) } else { Err("not yet".into()) }
    });
    let same = std::fs::read(&fa).expect("A") == std::fs::read(&fb).expect("B");
    assert!(same, "A and B read different bytes");
    step("b_writes_a_reads", "the same bytes on both");

    let stats = ok(
        "NodeGetVolumeStats B",
        node_b.rt.block_on(node_b.node().node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.into(),
            volume_path: pb.display().to_string(),
            ..Default::default()
        })),
    );
    let total = stats.usage.first().map(|u| u.total).unwrap_or(0);
    assert!(total > 32 << 20 && stats.volume_condition.as_ref().is_some_and(|c| !c.abnormal), "{stats:?}");
    step("stats", &format!("B: {total} bytes"));

    // --- B lets go, A keeps it; then A ---
    let_go(&node_b, &sb, &pb);
    ok("ControllerUnpublish B", rt.block_on(ctl.controller().controller_unpublish_volume(unpublish("host-b"))));
    let v = ma.volume(vol);
    assert!(v["state"] == "attached" && v["attachedBy"] == serde_json::json!(["host-a"]), "{v}");
    assert!(std::fs::read_to_string(&fa).expect("A still reads").ends_with(&format!("{FINAL}\n")));
    step("b_lets_go", "still attached for host-a");
    assert_eq!(ma.volume(vol)["shareClients"], serde_json::json!([net.addr("a")]), "B is off the share's clients");
    // The share reads its clients every second.
    std::thread::sleep(Duration::from_secs(3));
    match try_mount(&net, "b", &ep, &base.join("b/again")) {
        Ok(()) => panic!("host b mounted {ep} after it let go"),
        Err(why) => step("b_refused", &why),
    }
    let_go(&node_a, &sa, &pa);
    ok("ControllerUnpublish A", rt.block_on(ctl.controller().controller_unpublish_volume(unpublish("host-a"))));
    let v = ma.volume(vol);
    assert!(v["state"] == "detached" && v["shareEndpoint"] == "", "{v}");
    step("a_lets_go", "detached");

    // --- published on B first: the engine and the share move there, every line kept ---
    let ctx = ok("ControllerPublish B again", rt.block_on(ctl.controller().controller_publish_volume(publish("host-b")))).publish_context;
    let ep_b = ctx.get("shareEndpoint").cloned().unwrap_or_default();
    assert!(ep_b.starts_with(&format!("nfs://{}:", net.addr("b"))), "shareEndpoint {ep_b:?}");
    ok("NodeStage B again", node_b.rt.block_on(node_b.node().node_stage_volume(stage(&sb, &ctx))));
    ok("NodePublish B again", node_b.rt.block_on(node_b.node().node_publish_volume(publish_at(&sb, &pb, &ctx))));
    let text = std::fs::read_to_string(&fb).expect("index.html on B");
    assert_eq!(check_view(&text), Ok(LINES), "{text}");
    assert!(text.ends_with(&format!("{FINAL}\n")), "{text}");
    step("moved_to_b", &ep_b);
    let_go(&node_b, &sb, &pb);
    ok("ControllerUnpublish B again", rt.block_on(ctl.controller().controller_unpublish_volume(unpublish("host-b"))));
    ok("DeleteVolume", rt.block_on(ctl.controller().delete_volume(csi::DeleteVolumeRequest { volume_id: vol.into(), ..Default::default() })));
    for m in [ma, mb] {
        let n = m.get("/v1/replicas")["data"].as_array().into_iter().flatten().filter(|r| r["volume"] == vol).count();
        assert_eq!(n, 0, "{} still keeps replicas of {vol}", m.url);
    }
    step("deleted", "no replica left");
    drop(cleanup);
}
