//! Shared-memory payloads for a replica on the engine's own host.
//!
//! A write sent through a socket is copied twice per replica (into the kernel by the
//! engine, out of it by the replica). For a replica on the same host the engine can
//! instead copy the data once into a memory file both processes map, and send over the
//! socket only a small descriptor naming where it is. With three local replicas one
//! copy serves all three.
//!
//! # Rules
//!
//! - The engine makes the pool: a memfd (`memfd_create`, name prefix [`MEMFD_NAME`])
//!   of `data_len + TAIL` bytes, sealed against shrinking and growing, whose last
//!   [`TAIL`] bytes hold a 32-byte random nonce. It offers the pool on a data
//!   connection, after the handshake and before any I/O, with SHARE_MEMORY and a JSON
//!   [`Attach`]: its pid, the fd number, `data_len` and the nonce (hex).
//! - The replica maps it (read and write, for READ_SHARED) through `/proc/PID/fd/FD` and accepts it only when
//!   the file is a memfd owned by the replica's own user, carries both seals, has
//!   exactly the size announced, and ends with the nonce announced: a wrong pid (the
//!   engine in another pid namespace) or a file that is not the pool is refused with
//!   an error reply, and the engine sends payloads inline as before. One attach per
//!   connection.
//! - WRITE_SHARED has a WRITE's header (offset, count, FUA); its payload is a 16-byte
//!   [`Descriptor`]: the data's offset in the pool and the CRC32C of the `count` bytes
//!   there. The frame's own CRC covers the descriptor as for any payload. A descriptor
//!   out of bounds or whose CRC does not match the memory is a damaged stream: the
//!   replica logs it and closes the connection, never applying the write.
//! - READ_SHARED has a READ's header; its payload is a [`Descriptor`] naming the region
//!   the engine lent for the data (CRC 0). The replica reads into it and replies with a
//!   descriptor of the same offset and the CRC32C of the `count` bytes it put there (an
//!   error reply carries a reason, as any). The engine takes the data only from the
//!   region it lent under that id and checks the CRC; a reply that names another
//!   region or does not match is a damaged stream, and the replica is dropped. The
//!   region comes back when the engine is done with the data (sent to its client).
//! - The engine writes a region only while no replica holds it: a region is lent to
//!   the replicas it was sent to and comes back when each of them has replied to that
//!   WRITE_SHARED (a replica replies only after it is done with the memory). A region
//!   lent to a connection that dies never comes back: a replica still reading it
//!   cannot see it change. The pool shrinks by that much; when no region fits, the
//!   request goes inline. A WRITE_SHARED or READ_SHARED reply for a region not lent to
//!   the replica sending it, or a second one, frees nothing: the replica is dropped.
//! - Trust: a replica that maps the pool can write all of it (one mapping serves
//!   writes and reads). It runs as the engine's user on the engine's host (the owner
//!   check), so it could already reach the engine's memory (`/proc/PID/mem`, ptrace):
//!   the pool opens nothing new. A refused SHARE_MEMORY gets a fixed reason; the real
//!   one, which may name another process's files, stays in the replica's log.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// The pool's memfd name (shown as `/memfd:longhorn-shm` in /proc): checked by the
/// replica before it maps the file.
pub const MEMFD_NAME: &str = "longhorn-shm";
/// Bytes after the data area: the nonce, then zeros to a page.
pub const TAIL: u64 = 4096;
const NONCE_LEN: usize = 32;
/// The pool is lent out in units of this many bytes.
pub const UNIT: u64 = 64 << 10;
/// Writes smaller than this go inline: a descriptor round trip saves nothing there.
pub const MIN_SHARED: usize = 64 << 10;
/// Size of the data area an engine session makes.
pub const POOL_LEN: u64 = 32 << 20;
/// Encoded length of a [`Descriptor`].
pub const DESCRIPTOR_LEN: usize = 16;
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// SHARE_MEMORY's payload: where the replica finds the pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attach {
    pub pid: u32,
    pub fd: i32,
    /// The data area's length; the file is this plus [`TAIL`].
    pub len: u64,
    /// 32 bytes, hex, found at `len` in the file.
    pub nonce: String,
}

/// WRITE_SHARED's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub offset: u64,
    pub crc: u32,
}

impl Descriptor {
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Descriptor, String> {
        if b.len() != DESCRIPTOR_LEN {
            return Err(format!("shared-memory descriptor of {} bytes (expected {DESCRIPTOR_LEN})", b.len()));
        }
        if b[12..16] != [0; 4] {
            return Err("shared-memory descriptor with its reserved bytes set".into());
        }
        let mut o = [0u8; 8];
        o.copy_from_slice(&b[0..8]);
        Ok(Descriptor { offset: u64::from_le_bytes(o), crc: u32::from_le_bytes([b[8], b[9], b[10], b[11]]) })
    }
}

/// A shared mapping, unmapped when the last user lets go.
struct Map {
    ptr: *mut u8,
    len: usize,
}

// The mapping is plain memory; who may write which part is the pool's business.
unsafe impl Send for Map {}
unsafe impl Sync for Map {}

impl Map {
    fn new(fd: &impl AsRawFd, len: usize, prot: libc::c_int) -> io::Result<Map> {
        // SAFETY: a fresh mapping of a file we hold open; the kernel picks the address.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map { ptr: p.cast(), len })
    }

    fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len));
        // SAFETY: in bounds (checked above) of a mapping that lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped; no slice outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Lent regions: which units each request holds, which replicas (bits of `holders`,
/// the engine's replica slots) it was lent to and have not replied, and whether the
/// engine's client still holds read data in it.
struct Loan {
    start: usize,
    units: usize,
    holders: u32,
    in_use: bool,
    /// Staged for a write and not lent yet (see [`Pool::stage`]): read data never is.
    staged: bool,
}

struct Lending {
    used: Vec<bool>,
    loans: HashMap<u64, Loan>,
}

impl Lending {
    fn free_if_done(&mut self, id: u64) {
        if let Some(l) = self.loans.get(&id).filter(|l| l.holders == 0 && !l.in_use) {
            let (s, n) = (l.start, l.units);
            self.loans.remove(&id);
            self.used[s..s + n].iter_mut().for_each(|u| *u = false);
        }
    }
}

/// The engine's pool (one per session).
pub struct Pool {
    file: OwnedFd,
    map: Map,
    data_len: u64,
    nonce: [u8; NONCE_LEN],
    lending: Mutex<Lending>,
}

impl Pool {
    pub fn new(data_len: u64) -> io::Result<Pool> {
        let name = std::ffi::CString::new(MEMFD_NAME).map_err(io::Error::other)?;
        // SAFETY: a valid C string; the fd returned is ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::new(io::Error::last_os_error().kind(), format!("memfd_create: {}", io::Error::last_os_error())));
        }
        // SAFETY: `fd` was just returned to us and is owned by nothing else.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        let total = data_len + TAIL;
        // SAFETY: plain syscalls on our fd.
        if unsafe { libc::ftruncate(fd, total as libc::off_t) } != 0 || unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, SEALS) } != 0 {
            return Err(io::Error::new(io::Error::last_os_error().kind(), format!("sizing and sealing the pool: {}", io::Error::last_os_error())));
        }
        let map = Map::new(&file, total as usize, libc::PROT_READ | libc::PROT_WRITE)?;
        let mut nonce = [0u8; NONCE_LEN];
        crate::auth::fill_random(&mut nonce)?;
        // SAFETY: the tail is ours, in bounds, and no one reads it before the attach.
        unsafe { std::ptr::copy_nonoverlapping(nonce.as_ptr(), map.ptr.add(data_len as usize), NONCE_LEN) };
        let units = (data_len / UNIT) as usize;
        Ok(Pool { file, map, data_len, nonce, lending: Mutex::new(Lending { used: vec![false; units], loans: HashMap::new() }) })
    }

    /// What a replica needs to map this pool.
    pub fn attach(&self) -> Attach {
        Attach { pid: std::process::id(), fd: self.file.as_raw_fd(), len: self.data_len, nonce: crate::auth::hex(&self.nonce) }
    }

    /// Copies `data` into a free region lent to the replicas in `holders` (a bit per
    /// replica slot) under request `id`; returns the region's offset, or None when no
    /// region that big is free.
    pub fn put(&self, id: u64, data: &[u8], holders: u32) -> Option<u64> {
        let off = self.lend(id, data.len(), holders)?;
        // SAFETY: the region was just lent to us and no replica has been told of it; it
        // lies inside the data area (units cover data_len only).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.ptr.add(off as usize), data.len()) };
        Some(off)
    }

    /// Takes a free region of `len` bytes for request `id`, lent to the replicas in
    /// `holders`, to come back when each has replied ([`Pool::release`], or
    /// [`Pool::take`] and the data dropped); its offset, or None when none is free.
    pub fn lend(&self, id: u64, len: usize, holders: u32) -> Option<u64> {
        if holders == 0 {
            return None;
        }
        self.alloc(id, len, holders, false)
    }

    fn alloc(&self, id: u64, len: usize, holders: u32, staged: bool) -> Option<u64> {
        let n = (len as u64).div_ceil(UNIT) as usize;
        if n == 0 {
            return None;
        }
        let start = {
            let mut l = self.lending.lock().unwrap_or_else(|e| e.into_inner());
            let mut run = 0;
            let mut found = None;
            for (i, &u) in l.used.iter().enumerate() {
                run = if u { 0 } else { run + 1 };
                if run == n {
                    found = Some(i + 1 - n);
                    break;
                }
            }
            let s = found?;
            l.used[s..s + n].iter_mut().for_each(|u| *u = true);
            l.loans.insert(id, Loan { start: s, units: n, holders, in_use: staged, staged });
            s
        };
        Some(start as u64 * UNIT)
    }

    /// A region for the data of the write that will be request `id`, for the engine's
    /// client to be received straight into (no copy into the pool later). It stays the
    /// client's until the frozen bytes are dropped, and is lent to replicas with
    /// [`Pool::lend_staged`] meanwhile.
    pub fn stage(self: &Arc<Self>, id: u64, len: usize) -> Option<Staged> {
        let off = self.alloc(id, len, 0, true)?;
        Some(Staged { data: ReadData { pool: self.clone(), id, off: off as usize, len } })
    }

    /// The request id and offset of the staged region `data` lies in, if it is one
    /// (its bytes start a region still held by the client, not yet lent).
    pub fn staged_at(&self, data: &[u8]) -> Option<(u64, u64)> {
        let base = self.map.ptr as usize;
        let p = data.as_ptr() as usize;
        if p < base || p + data.len() > base + self.data_len as usize || (p - base) as u64 % UNIT != 0 {
            return None;
        }
        let unit = (p - base) / UNIT as usize;
        let l = self.lending.lock().unwrap_or_else(|e| e.into_inner());
        l.loans.iter().find(|(_, l)| l.start == unit && l.staged).map(|(&id, _)| (id, (p - base) as u64))
    }

    /// Lends staged region `id` to the replicas in `holders`.
    pub fn lend_staged(&self, id: u64, holders: u32) -> bool {
        let mut l = self.lending.lock().unwrap_or_else(|e| e.into_inner());
        match l.loans.get_mut(&id).filter(|l| l.staged) {
            Some(loan) => {
                loan.holders = holders;
                loan.staged = false;
                true
            }
            None => false,
        }
    }

    /// The data a READ_SHARED reply from replica `who` to request `id` says it put in
    /// the region lent to it: checked against the region and the CRC, and kept there
    /// (no copy) until the returned bytes are dropped, which gives the region back. On
    /// Err the region is given back at once if it was lent to `who` (it has replied: it
    /// is done with it); a reply for a region not lent to `who`, or a second one, is Err
    /// and changes nothing.
    pub fn take(self: &Arc<Self>, id: u64, who: usize, count: u32, desc: &[u8]) -> Result<Bytes, String> {
        let (off, room) = {
            let mut l = self.lending.lock().unwrap_or_else(|e| e.into_inner());
            let Some(loan) = l.loans.get_mut(&id).filter(|l| l.holders & bit(who) != 0) else {
                return Err(format!("READ_SHARED reply for id {id}, for which no region was lent to this replica"));
            };
            // Answered: whatever follows, this replica is done with it, and the data
            // (if good) is the client's until dropped.
            loan.holders &= !bit(who);
            loan.in_use = true;
            (loan.start as u64 * UNIT, loan.units as u64 * UNIT)
        };
        let give_back = |why: String| {
            self.done_with(id);
            Err(why)
        };
        let d = match Descriptor::decode(desc) {
            Ok(d) if d.offset == off && count as u64 <= room => d,
            Ok(d) => return give_back(format!("READ_SHARED reply names region {}+{count}; {off}+{room} was lent", d.offset)),
            Err(e) => return give_back(e),
        };
        let data = self.map.slice(off as usize, count as usize);
        let got = crate::proto::checksum(data);
        if got != d.crc {
            return give_back(format!("READ_SHARED data checksum mismatch for id {id}: reply says {:#010x}, memory has {got:#010x}", d.crc));
        }
        Ok(Bytes::from_owner(ReadData { pool: self.clone(), id, off: off as usize, len: count as usize }))
    }

    /// Replica `who` replied to request `id` and is done with its region; the last
    /// reply frees it. False when no region of `id` was lent to `who` (or it already
    /// replied): the caller treats that reply as a damaged stream.
    pub fn release(&self, id: u64, who: usize) -> bool {
        let mut l = self.lending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(loan) = l.loans.get_mut(&id).filter(|l| l.holders & bit(who) != 0) else { return false };
        loan.holders &= !bit(who);
        l.free_if_done(id);
        true
    }

    /// The engine's client is done with read data in `id`'s region.
    fn done_with(&self, id: u64) {
        let mut l = self.lending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(loan) = l.loans.get_mut(&id) {
            loan.in_use = false;
        }
        l.free_if_done(id);
    }

    /// Units lent out now (tests, and the log when the pool runs dry).
    pub fn units_lent(&self) -> usize {
        self.lending.lock().unwrap_or_else(|e| e.into_inner()).used.iter().filter(|&&u| u).count()
    }
}

fn bit(who: usize) -> u32 {
    1u32.checked_shl(who as u32).unwrap_or(0)
}

/// A staged region being filled by the engine's client (see [`Pool::stage`]).
pub struct Staged {
    data: ReadData,
}

impl Staged {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: in bounds of the pool's data area (allocated so), and ours alone: no
        // replica has been told of the region, and nothing else writes it until the
        // frozen bytes are dropped.
        unsafe { std::slice::from_raw_parts_mut(self.data.pool.map.ptr.add(self.data.off), self.data.len) }
    }

    /// The filled region as the write's data.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self.data)
    }
}

/// Data in a region of the pool (read, or staged for a write), which comes back when
/// the last copy of the `Bytes` holding it goes and every replica lent it replied.
struct ReadData {
    pool: Arc<Pool>,
    id: u64,
    off: usize,
    len: usize,
}

impl AsRef<[u8]> for ReadData {
    fn as_ref(&self) -> &[u8] {
        self.pool.map.slice(self.off, self.len)
    }
}

impl Drop for ReadData {
    fn drop(&mut self) {
        self.pool.done_with(self.id);
    }
}

/// A replica's view of an engine's pool.
pub struct Mapping {
    map: Map,
    data_len: u64,
}

fn refuse(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl Mapping {
    /// Maps the pool `a` names, checking it is what it claims (see the module rules).
    pub fn open(a: &Attach) -> io::Result<Arc<Mapping>> {
        let path = format!("/proc/{}/fd/{}", a.pid, a.fd);
        let target = std::fs::read_link(&path).map_err(|e| refuse(format!("shared memory {path}: {e}")))?;
        if !target.to_string_lossy().starts_with(&format!("/memfd:{MEMFD_NAME}")) {
            return Err(refuse(format!("shared memory {path} is {}, not the engine's pool", target.display())));
        }
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking and no controlling tty: whatever the engine names, opening it
        // must not wait or take over a terminal before the checks below refuse it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| refuse(format!("shared memory {path}: {e}")))?;
        let md = file.metadata()?;
        if !md.is_file() {
            return Err(refuse(format!("shared memory {path} is not a memory file")));
        }
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if md.uid() != me {
            return Err(refuse(format!("shared memory {path} belongs to uid {}, not {me}", md.uid())));
        }
        let total = a.len.checked_add(TAIL).ok_or_else(|| refuse("shared memory length overflows".into()))?;
        if a.len == 0 || md.len() != total {
            return Err(refuse(format!("shared memory {path} is {} bytes, the engine said {}", md.len(), total)));
        }
        // SAFETY: a plain fcntl on a file we hold.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err(refuse(format!("shared memory {path} is not sealed against resizing")));
        }
        let map = Map::new(&file, total as usize, libc::PROT_READ | libc::PROT_WRITE)?;
        if crate::auth::hex(map.slice(a.len as usize, NONCE_LEN)) != a.nonce {
            return Err(refuse(format!("shared memory {path} does not carry the engine's nonce")));
        }
        Ok(Arc::new(Mapping { map, data_len: a.len }))
    }

    /// The `count` bytes a WRITE_SHARED payload names, checked against their CRC. The
    /// bytes are not copied: they stay in the pool, which the engine leaves alone until
    /// this replica replies.
    pub fn payload(self: &Arc<Self>, count: u32, desc: &[u8]) -> Result<Bytes, String> {
        let d = self.locate(count, desc)?;
        let data = self.map.slice(d.offset as usize, count as usize);
        let got = crate::proto::checksum(data);
        if got != d.crc {
            return Err(format!("shared-memory payload checksum mismatch: descriptor says {:#010x}, memory has {got:#010x}", d.crc));
        }
        Ok(Bytes::from_owner(View { map: self.clone(), off: d.offset as usize, len: count as usize }))
    }
}

impl Mapping {
    /// The region a READ_SHARED names, for the replica to read `count` bytes into.
    /// The caller writes it only while it answers that request: the engine lent it
    /// for this and touches it again only after the reply.
    pub fn region(&self, count: u32, desc: &[u8]) -> Result<(u64, &mut [u8]), String> {
        let d = self.locate(count, desc)?;
        // SAFETY: in bounds (checked above) of a writable mapping that lives as long as
        // `self`; no one else writes the region while it is lent (the module rules).
        let s = unsafe { std::slice::from_raw_parts_mut(self.map.ptr.add(d.offset as usize), count as usize) };
        Ok((d.offset, s))
    }
}

impl Mapping {
    /// The descriptor `desc`, when `count` bytes at its offset lie inside the pool.
    fn locate(&self, count: u32, desc: &[u8]) -> Result<Descriptor, String> {
        let d = Descriptor::decode(desc)?;
        if d.offset.checked_add(count as u64).is_none_or(|e| e > self.data_len) {
            return Err(format!("shared-memory region {}+{count} outside the {}-byte pool", d.offset, self.data_len));
        }
        Ok(d)
    }
}

/// A region of a mapping, kept mapped while any `Bytes` refers to it.
struct View {
    map: Arc<Mapping>,
    off: usize,
    len: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        self.map.map.slice(self.off, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn attach_ok() -> (Pool, Arc<Mapping>) {
        let p = Pool::new(1 << 20).expect("pool");
        let m = Mapping::open(&p.attach()).expect("the replica maps the pool");
        (p, m)
    }

    #[test]
    fn put_read_release() {
        let (p, m) = attach_ok();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        // Lent to replicas 0 and 2.
        let off = p.put(1, &data, 0b101).expect("room");
        assert_eq!(p.units_lent(), 4);
        let d = Descriptor { offset: off, crc: crate::proto::checksum(&data) }.encode();
        let got = m.payload(data.len() as u32, &d).expect("payload");
        assert_eq!(&got[..], &data[..]);
        assert!(p.release(1, 0));
        assert!(!p.release(1, 0), "replica 0 replied twice");
        assert!(!p.release(1, 1), "replica 1 was never lent it");
        assert_eq!(p.units_lent(), 4, "replica 2 still holds it");
        assert!(p.release(1, 2));
        assert_eq!(p.units_lent(), 0);
    }

    #[test]
    fn a_full_pool_says_so_and_lent_regions_never_overlap() {
        let p = Pool::new(4 * UNIT).expect("pool");
        let a = p.put(1, &[1u8; 2 * UNIT as usize], 1).expect("room");
        let b = p.put(2, &[2u8; UNIT as usize + 1], 1).expect("room");
        assert!(a + 2 * UNIT <= b || b + 2 * UNIT <= a);
        assert_eq!(p.put(3, &[3u8; 10], 1), None, "all four units are lent");
        assert!(p.release(1, 0));
        assert!(p.put(3, &[3u8; 10], 1).is_some());
        assert_eq!(p.put(4, &[], 1), None);
    }

    #[test]
    fn a_read_region_comes_back_when_its_bytes_go() {
        let p = Arc::new(Pool::new(1 << 20).expect("pool"));
        let m = Mapping::open(&p.attach()).expect("the replica maps the pool");
        let off = p.lend(5, 100_000, 1).expect("room");
        let ask = Descriptor { offset: off, crc: 0 }.encode();
        let (at, dst) = m.region(100_000, &ask).expect("region");
        dst.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let crc = crate::proto::checksum(dst);
        let reply = Descriptor { offset: at, crc }.encode();
        assert!(p.take(5, 1, 100_000, &reply).is_err(), "replica 1 was not lent it");
        let data = p.take(5, 0, 100_000, &reply).expect("data");
        assert!(p.take(5, 0, 100_000, &reply).is_err(), "a second reply takes nothing");
        assert!(!p.release(5, 0), "nor does an error reply after it");
        assert!(data.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert_eq!(p.staged_at(&data), None, "read data is never taken for a staged write");
        let copy = data.clone();
        drop(data);
        assert_eq!(p.units_lent(), 2, "a copy of the bytes still holds it");
        drop(copy);
        assert_eq!(p.units_lent(), 0);
        // A reply naming another region, a bad CRC, an id never lent: refused, given back.
        let off = p.lend(6, 4096, 1).expect("room");
        assert!(p.take(6, 0, 4096, &Descriptor { offset: off + UNIT, crc: 0 }.encode()).is_err());
        assert_eq!(p.units_lent(), 0);
        let off = p.lend(7, 4096, 1).expect("room");
        assert!(p.take(7, 0, 4096, &Descriptor { offset: off, crc: 1 }.encode()).unwrap_err().contains("checksum"));
        assert_eq!(p.units_lent(), 0);
        assert!(p.take(8, 0, 4096, &Descriptor { offset: 0, crc: 0 }.encode()).is_err());
        assert!(m.region(4096, &Descriptor { offset: (1 << 20) - 10, crc: 0 }.encode()).is_err());
    }

    #[test]
    fn a_staged_write_is_lent_without_a_copy_and_comes_back_last() {
        let p = Arc::new(Pool::new(1 << 20).expect("pool"));
        let m = Mapping::open(&p.attach()).expect("the replica maps the pool");
        let mut st = p.stage(9, 70_000).expect("room");
        st.as_mut_slice().fill(0xAB);
        let data = st.freeze();
        let (id, off) = p.staged_at(&data).expect("staged");
        assert_eq!(id, 9);
        assert_eq!(p.staged_at(&data[1..]), None, "not the start of a region");
        assert_eq!(p.staged_at(&[0u8; 10]), None, "not in the pool");
        assert!(p.lend_staged(9, 0b11));
        assert!(!p.lend_staged(9, 0b11), "lent once");
        let d = Descriptor { offset: off, crc: crate::proto::checksum(&data) }.encode();
        assert!(m.payload(70_000, &d).expect("payload").iter().all(|&b| b == 0xAB));
        assert!(p.release(9, 0) && p.release(9, 1));
        assert_eq!(p.units_lent(), 2, "the client still holds the bytes");
        drop(data);
        assert_eq!(p.units_lent(), 0);
        // Dropped unsent: it comes back too.
        drop(p.stage(10, 4096).expect("room"));
        assert_eq!(p.units_lent(), 0);
    }

    #[test]
    fn bad_descriptors_are_refused() {
        let (p, m) = attach_ok();
        let data = vec![9u8; 4096];
        let off = p.put(1, &data, 1).expect("room");
        let crc = crate::proto::checksum(&data);
        let wrong_crc = Descriptor { offset: off, crc: crc ^ 1 }.encode();
        assert!(m.payload(4096, &wrong_crc).unwrap_err().contains("checksum"));
        let outside = Descriptor { offset: (1 << 20) - 100, crc }.encode();
        assert!(m.payload(4096, &outside).unwrap_err().contains("outside"));
        let wrapping = Descriptor { offset: u64::MAX - 10, crc }.encode();
        assert!(m.payload(4096, &wrapping).unwrap_err().contains("outside"));
        assert!(m.payload(4096, &[0u8; 15]).is_err());
        let mut reserved = Descriptor { offset: off, crc }.encode();
        reserved[15] = 1;
        assert!(m.payload(4096, &reserved).is_err());
    }

    #[test]
    fn an_attach_that_names_the_wrong_file_is_refused() {
        let p = Pool::new(1 << 20).expect("pool");
        let good = p.attach();
        let mut a = good.clone();
        a.nonce = crate::auth::hex(&[0u8; 32]);
        assert!(Mapping::open(&a).err().expect("refused").to_string().contains("nonce"));
        let mut a = good.clone();
        a.len += UNIT;
        assert!(Mapping::open(&a).err().expect("refused").to_string().contains("bytes"));
        // A file that is not a memfd (stdin is whatever the test runner gave us, or a
        // regular file opened here).
        let f = File::open("/proc/self/status").expect("open");
        let a = Attach { pid: std::process::id(), fd: f.as_raw_fd(), len: 1 << 20, nonce: good.nonce.clone() };
        assert!(Mapping::open(&a).err().expect("refused").to_string().contains("not the engine's pool"));
        let a = Attach { pid: u32::MAX, ..good };
        assert!(Mapping::open(&a).is_err());
    }
}
