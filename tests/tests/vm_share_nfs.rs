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
use std::time::Duration;

const STEPS: &[&str] = &[
    "modules", "engine", "start", "mount_a", "mount_b", "server_restart", "kill_replica", "writer", "reader", "append",
    "same_bytes", "replica_err", "volume_info", "umount", "stop", "e2fsck", "content", "all",
];
const VM_TIMEOUT: Duration = Duration::from_secs(8 * 60);


#[test]
fn vm_share_two_kernel_nfs_mounts() {
    let run = vm::run("share_nfs.sh", &[], "vm-share-console.log", VM_TIMEOUT);
    let (console, ctx) = (&run.console, &run.ctx);
    eprintln!("VM share scenario, boot to poweroff {:?}:\n{}", run.elapsed, run.steps().join("\n"));
    assert!(!run.timed_out, "the VM did not finish within {VM_TIMEOUT:?}; {ctx}");
    let status = |name: &str| run.status(name);
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
