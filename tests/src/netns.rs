//! Hosts of their own on one machine: network namespaces joined by veth pairs to a
//! bridge in a namespace of its own, with addresses the test makes (10.201.0.0/24;
//! nothing leaves the namespaces). Cutting a host's link, or dropping a share of its
//! packets, makes the faults of a real network.

use crate::{bin, sh, Proc};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Hosts on one bridge, each a network namespace with one interface `eth0`.
pub struct Net {
    prefix: String,
    pub hosts: Vec<String>,
}

pub fn ip(args: &str) {
    sh(&format!("ip {args}"));
}

impl Net {
    pub fn new(hosts: &[&str]) -> Net {
        // Unique per network: tests of one binary run at the same time.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("lh{}n{n}", std::process::id() % 100000);
        let net = Net { prefix, hosts: hosts.iter().map(|h| h.to_string()).collect() };
        let sw = net.ns("sw");
        ip(&format!("netns add {sw}"));
        ip(&format!("-n {sw} link add br0 type bridge"));
        ip(&format!("-n {sw} link set br0 up"));
        for (i, h) in hosts.iter().enumerate() {
            let ns = net.ns(h);
            ip(&format!("netns add {ns}"));
            ip(&format!("-n {ns} link set lo up"));
            ip(&format!("link add eth0 netns {ns} type veth peer name p{i} netns {sw}"));
            ip(&format!("-n {sw} link set p{i} master br0"));
            ip(&format!("-n {sw} link set p{i} up"));
            ip(&format!("-n {ns} addr add {}/24 dev eth0", net.addr(h)));
            ip(&format!("-n {ns} link set eth0 up"));
        }
        net
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    pub fn addr(&self, host: &str) -> String {
        let i = self.hosts.iter().position(|h| h == host).expect("known host");
        format!("10.201.0.{}", 10 + i)
    }

    /// Drops every packet to and from `host` (its link goes down).
    pub fn cut(&self, host: &str) {
        ip(&format!("-n {} link set eth0 down", self.ns(host)));
    }

    pub fn heal(&self, host: &str) {
        ip(&format!("-n {} link set eth0 up", self.ns(host)));
    }

    /// Drops `pct` percent of `host`'s packets, both ways, at random (nftables in its
    /// namespace: real loss, which TCP retransmits).
    pub fn lose(&self, host: &str, pct: u32) {
        let ns = self.ns(host);
        sh(&format!("ip netns exec {ns} nft add table inet loss"));
        for hook in ["input", "output"] {
            sh(&format!("ip netns exec {ns} nft add chain inet loss {hook} '{{ type filter hook {hook} priority 0; }}'"));
            sh(&format!("ip netns exec {ns} nft add rule inet loss {hook} numgen random mod 100 '<' {pct} drop"));
        }
    }

    pub fn no_loss(&self, host: &str) {
        sh(&format!("ip netns exec {} nft delete table inet loss", self.ns(host)));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in self.hosts.iter().map(|h| h.as_str()).chain(["sw"]) {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(h)]).status();
        }
    }
}

/// `longhorn ARGS` inside host `host`'s namespace, waiting for `word` on stdout.
pub fn spawn_on(net: &Net, host: &str, args: &[&str], log: &Path, word: &str) -> Result<(Proc, String), String> {
    let logf = std::fs::File::create(log).map_err(|e| e.to_string())?;
    // nsenter joins the host's network namespace only: unlike `ip netns exec` it keeps
    // the mount namespace, so block devices, FUSE and mounts made there are everyone's.
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", net.ns(host)))
        .arg("--")
        .arg(bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .map_err(|e| e.to_string())?;
    crate::ready(child, log, word).map_err(|e| format!("{args:?} on {host} {e}"))
}

/// Unmounts what a multi-host test mounted and stops what it started on the hosts
/// (whatever runs on `dir/host-*`), pass or fail.
pub struct Cleanup {
    pub mounts: Vec<PathBuf>,
    pub dir: PathBuf,
}
impl Drop for Cleanup {
    fn drop(&mut self) {
        unmount_all(&self.mounts);
        // Engines and replicas run in sessions of their own (they outlive a manager by
        // design): whatever still runs on this test's directories goes, and so do the
        // FUSE mounts and loop devices of engines killed that way.
        let d = self.dir.display();
        let _ = crate::sh_try(&format!("pkill -9 -f -- '{d}/host-'"));
        let _ = crate::sh_try(&format!("losetup -l -n -O NAME,BACK-FILE | grep -F '{d}/' | cut -d' ' -f1 | xargs -r -n1 losetup -d"));
        let _ = crate::sh_try(&format!("grep -o ' {d}/[^ ]*\\.fuse ' /proc/self/mounts | xargs -r -n1 umount -l"));
    }
}

/// Mounts a test made, unmounted when it is dropped. Declared after the managers and
/// node plugins, it runs before them: a failed test then tears down like a passing
/// one, shares unmounted before their servers stop (a manager deleting a volume that
/// is still mounted over NFS waits on it).
pub struct Unmounts(pub Vec<PathBuf>);

impl Drop for Unmounts {
    fn drop(&mut self) {
        unmount_all(&self.0);
    }
}

/// Unmounts `mounts`, last first.
fn unmount_all(mounts: &[PathBuf]) {
    for p in mounts.iter().rev() {
        for _ in 0..4 {
            // From the mount table, not `mountpoint` or `umount` alone: both stat the
            // path, which waits for ever on an NFS mount (hard) whose server stopped.
            let Some(fstype) = mounted_at(p) else { break };
            let cmd = if fstype.starts_with("nfs") {
                format!("umount -f -l '{}'", p.display())
            } else {
                format!("timeout 30 umount '{0}' || umount -l '{0}'", p.display())
            };
            let _ = crate::sh_try(&cmd);
        }
    }
}

/// The type of the filesystem mounted at `p` (the last mount there).
fn mounted_at(p: &Path) -> Option<String> {
    crate::mount_table().into_iter().rev().find(|m| m.point == p).map(|m| m.fstype)
}
