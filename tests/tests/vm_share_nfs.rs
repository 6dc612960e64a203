//! ReadWriteMany with the kernel's NFS client: a VM (qemu, TCG) boots Debian's 6.12
//! kernel with the host's root shared read-only (tests/vm/prepare.sh, tests/vm/init),
//! loads nbd and nfsv4, and runs tests/vm/share_nfs.sh: engine + 3 replicas on the
//! kernel NBD device, `longhorn share vol1`, two NFSv4 mounts (4.1 and 4.0), a writer
//! on one and a reader on the other while the NFS server and then a replica are
//! killed, a final append by the reader, the same bytes on both mounts, an ordered
//! stop, e2fsck and the content on the volume itself.
//!
//! If the VM cannot be set up this test fails and says why: it never passes silently.

use longhorn_tests::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: &[&str] = &[
    "modules", "engine", "start", "mount_a", "mount_b", "server_restart", "kill_replica", "writer", "reader", "append",
    "same_bytes", "replica_err", "volume_info", "umount", "stop", "e2fsck", "content", "all",
];
const VM_TIMEOUT: Duration = Duration::from_secs(8 * 60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("workspace root")
}

#[test]
fn vm_share_two_kernel_nfs_mounts() {
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
    let script = vm_visible(&root().join("tests/vm/share_nfs.sh"));
    let append = format!(
        "console=ttyS0 quiet loglevel=3 panic=-1 lh.script={} lh.args={} lh.moddir={moddir}",
        script.display(),
        bin.display()
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
    let log_path = root().join("target/vm-share-console.log");
    let _ = std::fs::write(&log_path, &console);
    let steps: Vec<&str> = console.lines().filter_map(|l| l.find("STEP ").map(|i| &l[i..])).collect();
    eprintln!("VM share scenario, boot to poweroff {:?}:\n{}", t0.elapsed(), steps.join("\n"));
    let tail: String = console.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let ctx = format!("console in {}; qemu stderr: {err}\nsteps:\n{}\nconsole tail:\n{tail}", log_path.display(), steps.join("\n"));
    assert!(!timed_out, "the VM did not finish within {VM_TIMEOUT:?}; {ctx}");
    let status = |name: &str| {
        steps.iter().find_map(|l| {
            let mut w = l.split_whitespace().skip(1);
            (w.next() == Some(name)).then(|| w.next().unwrap_or("").to_string())
        })
    };
    let mut failed = Vec::new();
    if status("vm.boot").as_deref() != Some("OK") {
        failed.push(format!("vm.boot: {:?}", status("vm.boot")));
    }
    for s in STEPS {
        let n = format!("share.{s}");
        if status(&n).as_deref() != Some("OK") {
            failed.push(format!("{n}: {}", status(&n).unwrap_or_else(|| "missing".into())));
        }
    }
    assert!(console.contains("VM-DONE"), "the scenario did not finish; {ctx}");
    assert!(failed.is_empty(), "VM steps not OK: {failed:?}; {ctx}");
}
