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
use std::path::{Path, PathBuf};
use std::time::Duration;

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
/// Steps of the kernel block devices: the queue limits they declare (write-back cache,
/// FUA, 1 GiB discards, WRITE_ZEROES offered; for ublk also a hardware queue per CPU),
/// that FUA writes, WRITE_ZEROES, DISCARD and FLUSH go through, and that a 64 MiB
/// discard (one request), `blkdiscard -z` and `fallocate -z` read back zeros.
const DEVICE_STEPS: &[&str] = &["limits", "discard_zeroes", "long_ranges"];
const EXTRA_STEPS: &[(&str, &[&str])] = &[("ublk", DEVICE_STEPS), ("nbd", DEVICE_STEPS)];
const VM_TIMEOUT: Duration = Duration::from_secs(8 * 60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("workspace root")
}

#[test]
fn vm_kernel_nbd_and_ublk_scenario() {
    let run = vm::run("scenario.sh", &[frontends().join(",")], "vm-console.log", VM_TIMEOUT);
    let (console, ctx) = (&run.console, &run.ctx);
    let fio: Vec<&str> = console.lines().filter(|l| l.starts_with("FIO ")).collect();
    let report = format!("VM (TCG, indicative only) fio IOPS, boot to poweroff {:?}:\n{}\n", run.elapsed, fio.join("\n"));
    let _ = std::fs::write(root().join("target/frontend-fio-vm.txt"), &report);
    eprintln!("{report}");
    assert!(!run.timed_out, "the VM did not finish within {VM_TIMEOUT:?}; {ctx}");
    let status = |name: &str| run.status(name);
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
