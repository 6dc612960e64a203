//! `--frontend fuse` on this host: the volume as a FUSE file on a loop device with
//! direct I/O, used as a user would: mkfs.ext4, mount, files with checksums, fio with
//! verification while a replica is killed, e2fsck, remount, stop. And the same fio on
//! the block device and on the NBD export, one after the other, for the record.

use longhorn_tests::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn require(tools: &[&str]) {
    for t in tools {
        assert!(have(t), "{t} is not installed (tests/run installs it)");
    }
}

/// Restarts the cluster's engine with `--frontend fuse`; returns the device node path.
fn start_with_fuse(c: &mut Cluster) -> PathBuf {
    c.stop_engine();
    let mut args = c.engine_args();
    args.extend(["--frontend".into(), "fuse".into()]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let log = c.path("engine-fuse.log");
    let (proc, uri) = spawn(&a, &log, "ready").expect("engine with --frontend fuse starts");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    c.engine = Some(Engine { proc, uri, sock: c.path("vol.nbd") });
    let dev = PathBuf::from("/dev/longhorn").join(&c.volume);
    assert!(dev.exists(), "{} exists after start; log:\n{text}", dev.display());
    dev
}

fn mount(dev: &Path, mnt: &Path) {
    std::fs::create_dir_all(mnt).expect("mount point");
    sh(&format!("mount '{}' '{}'", dev.display(), mnt.display()));
}

fn umount(mnt: &Path) {
    sh(&format!("umount '{}'", mnt.display()));
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct MountGuard(PathBuf);
impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = sh_try(&format!("umount '{}' 2>/dev/null", self.0.display()));
    }
}

fn fio_iops(out: &str, rw: &str) -> f64 {
    let v: serde_json::Value = out.find('{').and_then(|i| serde_json::from_str(&out[i..]).ok()).unwrap_or_default();
    v["jobs"][0][rw]["iops"].as_f64().unwrap_or(0.0)
}

#[test]
fn fuse_device_ext4_story_with_replica_kill() {
    require(&["mkfs.ext4", "e2fsck", "fio", "mount"]);
    let mut c = Cluster::new("lhtest-fuse1", 256 * MB, 3);
    let dev = start_with_fuse(&mut c);
    let t0 = Instant::now();

    // fio with verification on the raw device first (before mkfs).
    let (ok, errs, out) = fio(&format!(
        "--name=raw --filename='{}' --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
         --size=32M --verify=crc32c --verify_fatal=1 --do_verify=1",
        dev.display()
    ));
    assert!(ok && errs == 0, "raw device fio failed:\n{out}\nengine log:\n{}", c.engine_log());

    sh(&format!("mkfs.ext4 -q -F '{}'", dev.display()));
    let mnt = c.path("mnt");
    mount(&dev, &mnt);
    let _g = MountGuard(mnt.clone());
    let mut sums = Vec::new();
    for i in 0..4 {
        let f = mnt.join(format!("file{i}"));
        random_file(&f, (i + 1) * 3 * MB + 123);
        sums.push((f.clone(), sh(&format!("sha256sum '{}'", f.display()))));
    }
    sh("sync");
    // A snapshot of the live, mounted volume lands on every replica.
    let o = c.cli(&["snapshot", "create", "s1", "-v", &c.volume]);
    assert!(o.status.success(), "snapshot: {}", String::from_utf8_lossy(&o.stderr));
    for r in &c.replicas {
        assert!(r.dir.join("volume-snap-s1.img").exists(), "no snapshot layer in {}", r.dir.display());
    }

    // A stop while mounted is refused: the engine keeps serving.
    let pid = c.engine.as_ref().expect("engine").proc.pid();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.engine.as_mut().expect("engine").proc.alive(), "engine must refuse to stop while mounted");
    assert!(c.engine_log().contains("is mounted on"), "refusal is logged:\n{}", c.engine_log());
    sh(&format!("ls '{}' > /dev/null", mnt.display()));

    // fio with verification on a file in the filesystem; a replica is killed meanwhile.
    let fio_file = mnt.join("fio.dat");
    let args = format!(
        "--name=fs --filename='{}' --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
         --size=128M --verify=crc32c --verify_fatal=1 --do_verify=1 --fsync=64",
        fio_file.display()
    );
    let fio_thread = std::thread::spawn(move || fio(&args));
    // Kill once fio is past laying out its file, and make sure it is still running.
    let t = Instant::now();
    while std::fs::metadata(&fio_file).map(|m| m.len() < 128 * MB).unwrap_or(true) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    assert!(!fio_thread.is_finished(), "fio ended before the replica kill; the test would prove nothing");
    c.replicas[1].proc.kill9();
    let (ok, errs, out) = fio_thread.join().expect("fio thread");
    assert!(ok && errs == 0, "fio in the filesystem failed after a replica kill:\n{out}\nengine log:\n{}", c.engine_log());
    let rl = c.cli(&["replica", "ls", "-v", &c.volume, "--json"]);
    assert!(String::from_utf8_lossy(&rl.stdout).contains("ERR"), "the killed replica is ERR: {rl:?}");

    umount(&mnt);
    let (ok, out) = sh_try(&format!("e2fsck -fn '{}'", dev.display()));
    assert!(ok, "e2fsck -fn reports problems:\n{out}");
    mount(&dev, &mnt);
    for (f, sum) in &sums {
        assert_eq!(&sh(&format!("sha256sum '{}'", f.display())), sum, "{} changed", f.display());
    }
    umount(&mnt);

    c.stop_engine();
    assert!(!dev.exists(), "{} is removed on stop", dev.display());
    let loops = sh("losetup -l -n -O BACK-FILE");
    assert!(!loops.contains(&c.volume), "loop device detached on stop: {loops}");
    eprintln!("fuse story took {:?}", t0.elapsed());
}

/// The same fio on /dev/longhorn/<vol> (FUSE + loop) and on the NBD export of the same
/// engine, in one run; figures go to target/frontend-fio.txt for the record.
#[test]
fn fuse_device_vs_nbd_export_fio() {
    require(&["fio"]);
    let mut c = Cluster::new("lhtest-fuse2", 256 * MB, 3);
    let dev = start_with_fuse(&mut c);
    let uri = c.uri();
    let jobs = [("randwrite", "write", "4k", 32), ("randread", "read", "4k", 32), ("write", "write", "1M", 8)];
    let mut lines = vec!["frontend fio (3 replicas, 256 MiB volume, 6 s per job)".to_string()];
    for (rw, key, bs, qd) in jobs {
        let common = format!("--name=j --rw={rw} --bs={bs} --iodepth={qd} --size=192M --runtime=6 --time_based --ramp_time=1");
        let (ok1, e1, o1) = fio(&format!("{common} --filename='{}' --ioengine=libaio --direct=1", dev.display()));
        let (ok2, e2, o2) = fio(&format!("{common} --ioengine=nbd --uri='{uri}'"));
        assert!(ok1 && e1 == 0, "fio on {}:\n{o1}", dev.display());
        assert!(ok2 && e2 == 0, "fio on NBD:\n{o2}");
        let (a, b) = (fio_iops(&o1, key), fio_iops(&o2, key));
        let unit = if bs == "1M" { "MiB/s" } else { "IOPS" };
        lines.push(format!("{rw:>9} {bs:>3} QD{qd:<2}  fuse+loop {a:>9.0} {unit}   nbd export {b:>9.0} {unit}   ratio {:.2}", a / b.max(1.0)));
    }
    let report = lines.join("\n");
    eprintln!("{report}");
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/frontend-fio-host.txt");
    let _ = std::fs::write(&p, report + "\n");
    c.stop_engine();
    assert!(!dev.exists());
}
