//! The kernel block device frontends with the real drivers: a VM (qemu, TCG) boots
//! Debian's 6.12 kernel with the host's root shared read-only, loads nbd and ublk_drv,
//! and runs tests/vm/scenario.sh for each frontend: engine + 3 replicas, mkfs.ext4,
//! mount, files with checksums, fio --verify on the raw device and in the filesystem
//! with a replica killed meanwhile, e2fsck, remount and verify, a refused stop while
//! mounted, a clean stop that removes /dev/longhorn/vol1.
//!
//! tests/vm/prepare.sh fetches the kernel once (cached in /var/cache/longhorn-vm). If
//! the VM cannot be set up this test fails and says why: it never passes silently.

use longhorn_tests::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The frontends the scenario runs, in one boot (`LONGHORN_VM_FRONTENDS=nbd` narrows
/// it while working on one of them).
const FRONTENDS: &[&str] = &["nbd", "ublk"];

fn frontends() -> Vec<String> {
    match std::env::var("LONGHORN_VM_FRONTENDS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => FRONTENDS.iter().map(|s| s.to_string()).collect(),
    }
}
/// Steps every frontend must pass.
const STEPS: &[&str] = &[
    "engine", "device", "fio_raw", "mkfs", "mount", "files", "snapshot", "kill_replica", "fio_fs", "replica_err", "umount", "e2fsck",
    "checksums", "refuse_mounted", "stop",
];
/// Steps only one frontend has: ublk checks the queue limits it declares (write-back
/// cache, FUA, 32 MiB discard/write-zeroes, a hardware queue per CPU) and that FUA
/// writes, WRITE_ZEROES, DISCARD and FLUSH go through it.
const EXTRA_STEPS: &[(&str, &[&str])] = &[("ublk", &["limits", "discard_zeroes"])];
const VM_TIMEOUT: Duration = Duration::from_secs(8 * 60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("workspace root")
}

#[test]
fn vm_kernel_nbd_and_ublk_scenario() {
    let t0 = Instant::now();
    let prep = Command::new(root().join("tests/vm/prepare.sh")).output().expect("running tests/vm/prepare.sh");
    assert!(
        prep.status.success(),
        "the test VM could not be set up (tests/vm/prepare.sh):\n{}{}",
        String::from_utf8_lossy(&prep.stdout),
        String::from_utf8_lossy(&prep.stderr)
    );
    let out = String::from_utf8_lossy(&prep.stdout).to_string();
    let get = |k: &str| out.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string())).unwrap_or_else(|| panic!("prepare.sh printed no {k}: {out}"));
    let (kernel, initrd, moddir) = (get("KERNEL "), get("INITRD "), get("MODDIR "));
    let bin = vm_visible(&bin().canonicalize().expect("longhorn binary path"));
    let script = vm_visible(&root().join("tests/vm/scenario.sh"));
    let append = format!(
        "console=ttyS0 quiet loglevel=3 panic=-1 lh.script={} lh.args={},{} lh.moddir={moddir}",
        script.display(),
        bin.display(),
        frontends().join(",")
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
        .args(["-kernel", &kernel, "-initrd", &initrd, "-append", &append])
        .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64 (tests/run installs qemu-system-x86)");
    let mut stdout = child.stdout.take().expect("qemu stdout");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        String::from_utf8_lossy(&v).to_string()
    });
    let mut timed_out = false;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if t0.elapsed() > VM_TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = reader.join().unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let log_path = root().join("target/vm-console.log");
    let _ = std::fs::write(&log_path, &console);
    let fio: Vec<&str> = console.lines().filter(|l| l.starts_with("FIO ")).collect();
    let report = format!("VM (TCG, indicative only) fio IOPS, boot to poweroff {:?}:\n{}\n", t0.elapsed(), fio.join("\n"));
    let _ = std::fs::write(root().join("target/frontend-fio-vm.txt"), &report);
    eprintln!("{report}");
    let steps: Vec<&str> = console.lines().filter_map(|l| l.find("STEP ").map(|i| &l[i..])).collect();
    let tail: String = console.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let ctx = format!("console in {}; qemu stderr: {err}\nsteps:\n{}\nconsole tail:\n{tail}", log_path.display(), steps.join("\n"));
    assert!(!timed_out, "the VM did not finish within {VM_TIMEOUT:?}; {ctx}");
    let status = |name: &str| steps.iter().find_map(|l| {
        let mut w = l.split_whitespace().skip(1);
        (w.next() == Some(name)).then(|| w.next().unwrap_or("").to_string())
    });
    let mut failed = Vec::new();
    for s in ["vm.boot", "vm.modules"] {
        if status(s).as_deref() != Some("OK") {
            failed.push(format!("{s}: {:?}", status(s)));
        }
    }
    for f in frontends() {
        let extra = EXTRA_STEPS.iter().filter(|(k, _)| *k == f).flat_map(|(_, s)| s.iter());
        for s in STEPS.iter().chain(extra) {
            let n = format!("{f}.{s}");
            if status(&n).as_deref() != Some("OK") {
                failed.push(format!("{n}: {}", status(&n).unwrap_or_else(|| "missing".into())));
            }
        }
    }
    assert!(console.contains("VM-DONE"), "the scenario did not finish; {ctx}");
    assert!(failed.is_empty(), "VM steps not OK: {failed:?}; {ctx}");
}
