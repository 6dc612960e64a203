//! `--frontend nbd`: the kernel NBD driver connected to the engine's own NBD export.
//!
//! The engine opens several sockets to its export, does the client side of the
//! handshake on each (fixed newstyle, NBD_OPT_EXPORT_NAME: the kernel speaks simple
//! replies only), and hands them to the driver with generic netlink `NBD_CMD_CONNECT`
//! (include/uapi/linux/nbd-netlink.h): several connections (the export allows
//! multi-conn), a request timeout, and a dead-connection timeout. Kernels without the
//! netlink family get the ioctl interface (one connection, `NBD_DO_IT` on a thread).

use super::{Ctx, DeviceConfig, DeviceError, Result};
use crate::nbd::proto::{IHAVEOPT, NBDMAGIC, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_NO_ZEROES, NBD_OPT_EXPORT_NAME};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Seconds before the driver gives up on a request and resets the connection.
const REQUEST_TIMEOUT_S: u64 = 120;
/// Seconds the driver waits for a dead connection to be replaced before failing I/O.
const DEAD_CONN_TIMEOUT_S: u64 = 30;
const BLOCK: u64 = 4096;
/// Longest DISCARD the kernel is let send in one request. The engine takes any length
/// (it works through long ones in 16 MiB pieces, each under the I/O timeout), but the
/// driver gives a request REQUEST_TIMEOUT_S in all, and unbounded it would send up to
/// 4 GiB at once. (WRITE_ZEROES has no writable limit: the driver's own applies.)
const MAX_DISCARD: u64 = 1 << 30;

pub fn probe() -> std::result::Result<(), String> {
    if Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists() {
        return Ok(());
    }
    Err("the kernel has no NBD driver loaded (no /sys/module/nbd, no /dev/nbd0; try `modprobe nbd`)".into())
}

// --- generic netlink, by hand (linux/netlink.h, linux/genetlink.h) ---------------------

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Builds netlink attributes (4-byte aligned TLVs).
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self
    }
    fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.raw(ty, &v.to_ne_bytes())
    }
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.raw(ty, &v.to_ne_bytes())
    }
    fn nested(&mut self, ty: u16, inner: &Attrs) -> &mut Self {
        self.raw(ty | NLA_F_NESTED, &inner.0)
    }
}

/// Iterates the attributes of a message payload: (type without flags, data).
fn parse_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        let adv = (len + 3) & !3;
        b = &b[adv.min(b.len())..];
    }
    out
}

struct Genl {
    fd: OwnedFd,
    seq: u32,
}

impl Genl {
    fn open() -> std::io::Result<Genl> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_GENERIC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tv = libc::timeval { tv_sec: 10, tv_usec: 0 };
        // SAFETY: setsockopt with a timeval that lives across the call.
        unsafe {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32);
        }
        Ok(Genl { fd, seq: 1 })
    }

    /// Sends one request and returns the payloads (after the genl header) of the
    /// replies, up to the ACK; a netlink error becomes an `io::Error`.
    fn request(&mut self, family: u16, cmd: u8, attrs: &Attrs) -> std::io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let len = 16 + 4 + attrs.0.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&family.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[cmd, 1, 0, 0]);
        m.extend_from_slice(&attrs.0);
        // SAFETY: sending our buffer on our socket; the kernel is the default peer.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buffer and address live across the call.
        let r = unsafe {
            libc::sendto(self.fd.as_raw_fd(), m.as_ptr() as *const libc::c_void, m.len(), 0, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as u32)
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: receiving into our buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut b = &buf[..n as usize];
            while b.len() >= 16 {
                let mlen = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let ty = u16::from_ne_bytes([b[4], b[5]]);
                let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if mlen < 16 || mlen > b.len() {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let body = &b[16..mlen];
                if seq == self.seq {
                    match ty {
                        NLMSG_ERROR => {
                            let err = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                            if err == 0 {
                                return Ok(out);
                            }
                            return Err(std::io::Error::from_raw_os_error(-err));
                        }
                        NLMSG_DONE => return Ok(out),
                        _ if body.len() >= 4 => out.push(body[4..].to_vec()),
                        _ => {}
                    }
                }
                b = &b[((mlen + 3) & !3).min(b.len())..];
            }
        }
    }

    fn family(&mut self, name: &str) -> std::io::Result<u16> {
        let mut a = Attrs::default();
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        a.raw(CTRL_ATTR_FAMILY_NAME, &n);
        for msg in self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &a)? {
            for (ty, d) in parse_attrs(&msg) {
                if ty == CTRL_ATTR_FAMILY_ID && d.len() >= 2 {
                    return Ok(u16::from_ne_bytes([d[0], d[1]]));
                }
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no generic netlink family {name:?}")))
    }
}

// --- the client side of the NBD handshake ---------------------------------------------

enum Conn {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Conn {
    fn connect(listen: &str) -> std::io::Result<Conn> {
        if let Some(p) = listen.strip_prefix("unix:") {
            Ok(Conn::Unix(std::os::unix::net::UnixStream::connect(p)?))
        } else if let Some(a) = listen.strip_prefix("tcp:") {
            let s = std::net::TcpStream::connect(a)?;
            s.set_nodelay(true)?;
            Ok(Conn::Tcp(s))
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("NBD address {listen:?} is neither unix: nor tcp:")))
        }
    }
    fn rw(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Unix(s) => s,
            Conn::Tcp(s) => s,
        }
    }
    fn into_fd(self) -> OwnedFd {
        match self {
            Conn::Unix(s) => s.into(),
            Conn::Tcp(s) => s.into(),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn rd_u64(r: &mut dyn ReadWrite) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Connects and negotiates one transmission-phase socket; returns it with the export
/// size and the transmission flags.
fn handshake(listen: &str) -> std::io::Result<(OwnedFd, u64, u16)> {
    let mut c = Conn::connect(listen)?;
    let s = c.rw();
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    if rd_u64(s)? != NBDMAGIC || rd_u64(s)? != IHAVEOPT {
        return Err(bad("not a newstyle NBD server"));
    }
    let mut hf = [0u8; 2];
    s.read_exact(&mut hf)?;
    let hflags = u16::from_be_bytes(hf);
    let no_zeroes = hflags & NBD_FLAG_NO_ZEROES != 0;
    let cflags = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&cflags.to_be_bytes());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&NBD_OPT_EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes()); // empty name: the default export
    s.write_all(&m)?;
    let size = rd_u64(s)?;
    let mut tf = [0u8; 2];
    s.read_exact(&mut tf)?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok((c.into_fd(), size, u16::from_be_bytes(tf)))
}

// --- the device -------------------------------------------------------------------------

enum Via {
    Netlink { family: u16 },
    /// The ioctl interface: `NBD_DO_IT` blocks on this thread until disconnect.
    Ioctl { dev: std::fs::File, thread: Option<std::thread::JoinHandle<()>> },
}

pub struct NbdDevice {
    volume: String,
    index: u32,
    via: Option<Via>,
    /// Our copies of the sockets handed to the kernel; closed after disconnect.
    socks: Vec<OwnedFd>,
}

fn connections() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(2, 4)
}

impl NbdDevice {
    pub fn attach(cfg: &DeviceConfig) -> Result<NbdDevice> {
        let n = connections();
        let mut socks = Vec::new();
        let (mut size, mut flags) = (0, 0);
        for i in 0..n {
            let (fd, s, f) = handshake(&cfg.nbd_listen).ctx(|| format!("volume {}: NBD handshake on {} (connection {i})", cfg.volume, cfg.nbd_listen))?;
            socks.push(fd);
            (size, flags) = (s, f);
        }
        match Genl::open().and_then(|mut g| g.family("nbd").map(|f| (g, f))) {
            Ok((mut g, family)) => {
                if flags & NBD_FLAG_CAN_MULTI_CONN == 0 {
                    socks.truncate(1);
                }
                let mut items = Attrs::default();
                for s in &socks {
                    let mut fd = Attrs::default();
                    fd.u32(NBD_SOCK_FD, s.as_raw_fd() as u32);
                    items.nested(NBD_SOCK_ITEM, &fd);
                }
                let mut a = Attrs::default();
                a.u64(NBD_ATTR_SIZE_BYTES, size)
                    .u64(NBD_ATTR_BLOCK_SIZE_BYTES, BLOCK)
                    .u64(NBD_ATTR_SERVER_FLAGS, flags as u64)
                    .u64(NBD_ATTR_TIMEOUT, REQUEST_TIMEOUT_S)
                    .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, DEAD_CONN_TIMEOUT_S)
                    .nested(NBD_ATTR_SOCKETS, &items);
                let replies = g.request(family, NBD_CMD_CONNECT, &a).ctx(|| format!("volume {}: NBD_CMD_CONNECT (netlink) with {} sockets", cfg.volume, socks.len()))?;
                let index = replies
                    .iter()
                    .flat_map(|m| parse_attrs(m).into_iter().map(|(t, d)| (t, d.to_vec())).collect::<Vec<_>>())
                    .find(|(t, d)| *t == NBD_ATTR_INDEX && d.len() >= 4)
                    .map(|(_, d)| u32::from_ne_bytes([d[0], d[1], d[2], d[3]]))
                    .ok_or_else(|| DeviceError::Unsupported(format!("volume {}: NBD_CMD_CONNECT answered without a device index", cfg.volume)))?;
                let dev = NbdDevice { volume: cfg.volume.clone(), index, via: Some(Via::Netlink { family }), socks };
                dev.wait_ready(size)?;
                info!(volume = %cfg.volume, device = %dev.path().display(), connections = dev.socks.len(), "kernel NBD connected over netlink");
                Ok(dev)
            }
            Err(e) => {
                warn!(volume = %cfg.volume, "NBD netlink unavailable ({e}); using the ioctl interface with one connection");
                socks.truncate(1);
                Self::attach_ioctl(cfg, socks, size, flags)
            }
        }
    }

    fn attach_ioctl(cfg: &DeviceConfig, socks: Vec<OwnedFd>, size: u64, flags: u16) -> Result<NbdDevice> {
        const NBD_SET_SOCK: libc::c_ulong = 0xab00;
        const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
        const NBD_DO_IT: libc::c_ulong = 0xab03;
        const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
        const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
        const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
        const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;
        // A free device: one whose /sys/block/nbdN/pid does not exist.
        let index = (0..128u32)
            .find(|i| Path::new(&format!("/dev/nbd{i}")).exists() && !Path::new(&format!("/sys/block/nbd{i}/pid")).exists())
            .ok_or_else(|| DeviceError::Unsupported(format!("volume {}: no free /dev/nbdN", cfg.volume)))?;
        let path = format!("/dev/nbd{index}");
        let dev = std::fs::OpenOptions::new().read(true).write(true).open(&path).ctx(|| format!("opening {path}"))?;
        let fd = dev.as_raw_fd();
        let sock = socks[0].as_raw_fd();
        let set = |req: libc::c_ulong, v: libc::c_ulong, what: &str| -> Result<()> {
            // SAFETY: NBD ioctls taking a value argument, on our open device.
            if unsafe { libc::ioctl(fd, req, v) } != 0 {
                return Err(DeviceError::io(format!("volume {}: {what} on {path}", cfg.volume), std::io::Error::last_os_error()));
            }
            Ok(())
        };
        set(NBD_SET_BLKSIZE, BLOCK as libc::c_ulong, "NBD_SET_BLKSIZE")?;
        set(NBD_SET_SIZE_BLOCKS, (size / BLOCK) as libc::c_ulong, "NBD_SET_SIZE_BLOCKS")?;
        set(NBD_SET_TIMEOUT, REQUEST_TIMEOUT_S as libc::c_ulong, "NBD_SET_TIMEOUT")?;
        set(NBD_SET_FLAGS, flags as libc::c_ulong, "NBD_SET_FLAGS")?;
        set(NBD_SET_SOCK, sock as libc::c_ulong, "NBD_SET_SOCK")?;
        let raw: RawFd = fd;
        let vol = cfg.volume.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-do-it".into())
            .spawn(move || {
                // SAFETY: NBD_DO_IT serves the device until disconnect; the fd stays open
                // (owned by NbdDevice) until this thread is joined.
                let r = unsafe { libc::ioctl(raw, NBD_DO_IT) };
                if r != 0 {
                    tracing::debug!(volume = %vol, "NBD_DO_IT ended: {}", std::io::Error::last_os_error());
                }
                // SAFETY: as above.
                unsafe { libc::ioctl(raw, NBD_CLEAR_SOCK) };
            })
            .ctx(|| "starting the NBD_DO_IT thread".into())?;
        let d = NbdDevice { volume: cfg.volume.clone(), index, via: Some(Via::Ioctl { dev, thread: Some(thread) }), socks };
        d.wait_ready(size)?;
        info!(volume = %cfg.volume, device = %d.path().display(), "kernel NBD connected with ioctls");
        Ok(d)
    }

    /// Waits until the device shows its size (the driver sets it up asynchronously),
    /// then caps the length of one discard (see MAX_DISCARD).
    fn wait_ready(&self, size: u64) -> Result<()> {
        self.wait_size(size)?;
        let p = format!("/sys/block/nbd{}/queue/discard_max_bytes", self.index);
        if Path::new(&p).exists() {
            std::fs::write(&p, MAX_DISCARD.to_string()).ctx(|| format!("volume {}: capping discards in {p}", self.volume))?;
        }
        Ok(())
    }

    fn wait_size(&self, size: u64) -> Result<()> {
        let sys = format!("/sys/block/nbd{}/size", self.index);
        let t = Instant::now();
        loop {
            let sectors = std::fs::read_to_string(&sys).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
            if sectors * 512 == size && self.path().exists() {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(20) {
                return Err(DeviceError::Unsupported(format!("volume {}: {} did not come up with {size} bytes (sysfs says {} sectors)", self.volume, self.path().display(), sectors)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    pub fn detach(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(via) = self.via.take() else { return Ok(()) };
        let flushed = super::flush_blockdev(&self.path());
        let res = match via {
            Via::Netlink { family } => {
                let mut a = Attrs::default();
                a.u32(NBD_ATTR_INDEX, self.index);
                Genl::open().and_then(|mut g| g.request(family, NBD_CMD_DISCONNECT, &a)).map(|_| ()).ctx(|| format!("volume {}: NBD_CMD_DISCONNECT of {}", self.volume, self.path().display()))
            }
            Via::Ioctl { dev, mut thread } => {
                const NBD_DISCONNECT: libc::c_ulong = 0xab08;
                // SAFETY: ioctl without argument on our open device.
                let r = unsafe { libc::ioctl(dev.as_raw_fd(), NBD_DISCONNECT) };
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
                drop(dev);
                if r != 0 {
                    Err(DeviceError::io(format!("volume {}: NBD_DISCONNECT of {}", self.volume, self.path().display()), std::io::Error::last_os_error()))
                } else {
                    Ok(())
                }
            }
        };
        // The driver has let go of the sockets once the device has no pid any more.
        let pid = format!("/sys/block/nbd{}/pid", self.index);
        let t = Instant::now();
        while Path::new(&pid).exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.socks.clear();
        flushed.and(res)
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!(volume = %self.volume, "NBD device teardown: {e}");
        }
    }
}
