//! The replica data protocol: the wire format between an engine and a replica.
//!
//! # Frame layout
//!
//! Every message, in either direction, is a 40-byte header followed by `payload_len`
//! bytes of payload. All integers are little-endian (both ends are x86/ARM hosts; this
//! saves a byte swap per field on the hot path).
//!
//! ```text
//! off size field
//!   0   4  magic        0x4C48_5231 ("LHR1" read as LE bytes "1RHL")
//!   4   1  version      1
//!   5   1  op           Op code; a reply carries the op of its request
//!   6   2  flags        FLAG_FUA on writes; FLAG_REPLY on every reply
//!   8   8  id           chosen by the sender of a request, echoed in its reply
//!  16   8  offset       byte offset in the volume (I/O ops), 0 otherwise
//!  24   4  count        bytes the I/O op covers (READ: bytes wanted)
//!  28   4  payload_len  bytes following the header
//!  32   4  status       0 = ok, else a Linux errno (replies only; 0 in requests)
//!  36   4  crc          CRC32C of the payload (0 when payload_len == 0)
//! ```
//!
//! # Rules
//!
//! - The replica speaks first: a `Hello` reply frame (id 0) with a JSON [`Challenge`].
//!   The first request on a connection must then be `Hello` with a JSON [`Hello`]
//!   payload, proving the volume's secret (`auth` states the handshake); the replica
//!   refuses (status EACCES, EINVAL or EBUSY, reason in the payload, then closes) a
//!   wrong proof, another volume or size, or a second engine while one holds the lease
//!   (`server`). Nothing else is accepted before it.
//! - Requests are pipelined: a client may send many before reading replies, and replies
//!   may come back in any order; `id` pairs them. A connection is owned by one engine
//!   session, and an engine may open several connections to one replica.
//! - Every payload carries a CRC32C. A frame whose magic, version, length limits or
//!   CRC are wrong is never applied: the receiver logs what was wrong and closes the
//!   connection (a damaged stream cannot be resynchronised safely).
//! - WRITE: payload_len == count, payload is the data. READ reply: payload is `count`
//!   bytes of data. WRITE_ZEROES/TRIM: no payload. BLOCK_STATUS reply: payload is a
//!   sequence of (u32 length, u32 flags) pairs, flag bit 0 = hole.
//! - FLUSH replies only after every write this replica acknowledged before the FLUSH
//!   arrived (on any connection) is on stable storage. FLAG_FUA on a write means the
//!   same for that write before its reply.
//! - Control ops (INFO, REVISION, SET_MODE, CLOSE, SNAPSHOT*) carry JSON payloads;
//!   an error reply's payload is a one-line reason.
//! - Rebuild ops: CHAIN_FILES, FILE_EXTENTS, FILE_READ, FILE_HASH are served by a
//!   healthy replica to one being rebuilt (snapshot files only, never the head);
//!   REBUILD_BEGIN and REBUILD_SYNC are sent by the engine to the replica being rebuilt.
//! - Backup ops (see `export`): SNAPSHOT_READ (JSON `ExportRequest` payload, offset and
//!   count in the header; reply: the data as of that snapshot) and SNAPSHOT_RANGES
//!   (JSON `ExportRequest`; reply: JSON `SnapshotRanges`).
//! - Listings that grow with fragmentation are paged: FILE_EXTENTS and SNAPSHOT_RANGES
//!   take the page's start in `offset` and the most entries wanted in `count` (0: the
//!   replica's limit, 100 000); the reply's `next`, when set, is the `offset` to ask for
//!   next and is always past the one asked for.
//! - SETTLE (engine only, no payload) says every write this replica took is on every
//!   replica the engine uses: the engine sends it with I/O paused and nothing in flight.
//!   Until its next write the replica reports itself settled (`ReplicaInfo::unsettled`
//!   false), so a later engine may serve it with the other settled ones on equal
//!   revision counters. An engine never sends it to a replica that is not RW.
//! - SHARE_MEMORY (engine only, JSON `shm::Attach`), WRITE_SHARED (a WRITE whose data
//!   waits in memory both processes map) and READ_SHARED (a READ whose data the replica
//!   puts there), both with a `shm::Descriptor` for payload, are for a replica on the
//!   engine's host; `shm` states their rules. A replica that knows them
//!   says so in `ReplicaInfo::shared_writes`; an engine sends them to no other.
//! - Every name a peer sends that becomes a file name (snapshot, rebuild files) must
//!   pass `meta::check_layer_name`; anything else is refused with EINVAL.
//! - `payload_len` is at most [`MAX_PAYLOAD`]; `count` at most [`MAX_IO`].

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::io::{self, Read};

pub const MAGIC: u32 = 0x4C48_5231;
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 40;
/// Largest single I/O: matches the NBD frontend's advertised maximum.
pub const MAX_IO: u32 = 32 << 20;
/// Largest payload: one max I/O (control payloads are far smaller).
pub const MAX_PAYLOAD: u32 = MAX_IO;

pub const FLAG_FUA: u16 = 1 << 0;
pub const FLAG_REPLY: u16 = 1 << 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Hello = 1,
    Read = 2,
    Write = 3,
    WriteZeroes = 4,
    Trim = 5,
    Flush = 6,
    Ping = 7,
    BlockStatus = 8,
    WriteShared = 9,
    ReadShared = 10,
    Info = 16,
    Revision = 17,
    SetMode = 18,
    Close = 19,
    Snapshot = 20,
    SnapshotList = 21,
    SnapshotRemove = 22,
    SnapshotRevert = 23,
    ChainFiles = 24,
    FileExtents = 25,
    FileRead = 26,
    FileHash = 27,
    RebuildBegin = 28,
    RebuildSync = 29,
    SnapshotRead = 30,
    SnapshotRanges = 31,
    Settle = 32,
    ShareMemory = 33,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::Read,
            3 => Op::Write,
            4 => Op::WriteZeroes,
            5 => Op::Trim,
            6 => Op::Flush,
            7 => Op::Ping,
            8 => Op::BlockStatus,
            9 => Op::WriteShared,
            10 => Op::ReadShared,
            16 => Op::Info,
            17 => Op::Revision,
            18 => Op::SetMode,
            19 => Op::Close,
            20 => Op::Snapshot,
            21 => Op::SnapshotList,
            22 => Op::SnapshotRemove,
            23 => Op::SnapshotRevert,
            24 => Op::ChainFiles,
            25 => Op::FileExtents,
            26 => Op::FileRead,
            27 => Op::FileHash,
            28 => Op::RebuildBegin,
            29 => Op::RebuildSync,
            30 => Op::SnapshotRead,
            31 => Op::SnapshotRanges,
            32 => Op::Settle,
            33 => Op::ShareMemory,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub op: Op,
    pub flags: u16,
    pub id: u64,
    pub offset: u64,
    pub count: u32,
    pub payload_len: u32,
    pub status: u32,
    pub crc: u32,
}

/// What can be wrong with a frame. Each names the defect so the log says why a
/// connection was dropped.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:#010x} (expected {MAGIC:#010x})")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (expected {VERSION})")]
    BadVersion(u8),
    #[error("unknown op code {0}")]
    BadOp(u8),
    #[error("payload length {0} exceeds the limit {MAX_PAYLOAD}")]
    TooLong(u32),
    #[error("payload checksum mismatch for op {op:?} id {id}: header says {want:#010x}, payload has {got:#010x}")]
    BadChecksum { op: Op, id: u64, want: u32, got: u32 },
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl Header {
    pub fn request(op: Op, id: u64, offset: u64, count: u32) -> Header {
        Header { op, flags: 0, id, offset, count, payload_len: 0, status: 0, crc: 0 }
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.op as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.count.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.status.to_le_bytes());
        b[36..40].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(FrameError::BadVersion(b[4]));
        }
        let op = Op::from_u8(b[5]).ok_or(FrameError::BadOp(b[5]))?;
        let payload_len = u32_at(28);
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(payload_len));
        }
        Ok(Header {
            op,
            flags: u16::from_le_bytes([b[6], b[7]]),
            id: u64_at(8),
            offset: u64_at(16),
            count: u32_at(24),
            payload_len,
            status: u32_at(32),
            crc: u32_at(36),
        })
    }
}

/// CRC32C (Castagnoli, the iSCSI polynomial) of a payload; 0 for none.
pub fn checksum(payload: &[u8]) -> u32 {
    if payload.is_empty() {
        0
    } else {
        // The CRC-32/ISCSI parameters are CRC32C's; the result fits in 32 bits.
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, payload) as u32
    }
}

/// Reads one whole frame: header, then payload, checking the CRC.
pub fn read_frame<R: Read>(r: &mut R) -> Result<(Header, Bytes), FrameError> {
    let h = read_header(r)?;
    let n = h.payload_len as usize;
    let mut buf = Vec::with_capacity(n);
    let got = r.by_ref().take(n as u64).read_to_end(&mut buf)?;
    if got != n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("frame payload ends after {got} of {n} bytes")).into());
    }
    checked(h, Bytes::from(buf))
}

/// [`read_frame`] from a buffered socket, the replica's request loops (the engine's
/// reply collector uses an [`Assembler`]): the payload is read into memory that is never
/// zeroed first
/// ([`crate::net::read_payload`]). The same header rules and checksum.
pub fn read_frame_buffered<S: crate::net::RawSocket>(rd: &mut std::io::BufReader<S>) -> Result<(Header, Bytes), FrameError> {
    let h = read_header(rd)?;
    let payload = if h.payload_len == 0 {
        Bytes::new()
    } else {
        let mut buf = Vec::new();
        crate::net::read_payload(rd, h.payload_len as usize, &mut buf)?;
        Bytes::from(buf)
    };
    checked(h, payload)
}

fn read_header<R: Read>(r: &mut R) -> Result<Header, FrameError> {
    let mut hb = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut hb) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof { FrameError::Closed } else { e.into() });
    }
    Header::decode(&hb)
}

fn checked(h: Header, payload: Bytes) -> Result<(Header, Bytes), FrameError> {
    let got = checksum(&payload);
    if got != h.crc {
        return Err(FrameError::BadChecksum { op: h.op, id: h.id, want: h.crc, got });
    }
    Ok((h, payload))
}

/// Frames cut out of a byte stream as it arrives, for a reader that serves several
/// connections from one thread and so can never block in the middle of a frame.
///
/// Bytes go in through [`Assembler::spare`] and [`Assembler::filled`]; whole frames come
/// out of [`Assembler::next`], checked as [`read_frame`] checks them. A payload is cut
/// out of the receive buffer without a copy. After an error the stream is damaged and
/// the connection must be closed: `next` says nothing more about it.
#[derive(Default)]
pub struct Assembler {
    buf: BytesMut,
}

/// What [`Assembler::spare`] offers at least, so a burst of small replies is taken in
/// one receive.
const ASSEMBLER_CHUNK: usize = 64 * 1024;

impl Assembler {
    pub fn new() -> Assembler {
        Assembler::default()
    }

    /// Memory to receive into: room for the rest of the frame in progress (a big
    /// payload is then received straight into the memory it is handed on in), and at
    /// least a chunk for what follows.
    pub fn spare(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        let have = self.buf.len();
        // The rest of a frame whose header is in; its length is checked by `next`.
        let rest = if have >= HEADER_LEN {
            let len = u32::from_le_bytes([self.buf[28], self.buf[29], self.buf[30], self.buf[31]]).min(MAX_PAYLOAD);
            (HEADER_LEN + len as usize).saturating_sub(have)
        } else {
            0
        };
        let need = if rest > ASSEMBLER_CHUNK { rest } else { ASSEMBLER_CHUNK / 16 };
        if self.buf.capacity() - have < need {
            self.buf.reserve(need.max(ASSEMBLER_CHUNK));
        }
        self.buf.spare_capacity_mut()
    }

    /// Marks `n` bytes of [`Assembler::spare`] as received.
    ///
    /// # Safety
    /// The first `n` bytes of the last `spare` must have been written.
    pub unsafe fn filled(&mut self, n: usize) {
        let len = self.buf.len() + n;
        assert!(len <= self.buf.capacity(), "more bytes received than there was room for");
        // SAFETY: the caller wrote them; the bound is checked above.
        unsafe { self.buf.set_len(len) };
    }

    /// Bytes received that are not yet part of a frame handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, if one has arrived.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<(Header, Bytes), FrameError>> {
        if self.buf.len() < HEADER_LEN {
            return None;
        }
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&self.buf[..HEADER_LEN]);
        let h = match Header::decode(&hb) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        let total = HEADER_LEN + h.payload_len as usize;
        if self.buf.len() < total {
            return None;
        }
        let payload = if h.payload_len == 0 {
            self.buf.advance(HEADER_LEN);
            Bytes::new()
        } else {
            let mut f = self.buf.split_to(total);
            f.advance(HEADER_LEN);
            f.freeze()
        };
        Some(checked(h, payload))
    }
}

/// Appends a frame to `out` (a buffer later written with one syscall).
pub fn put_frame(out: &mut Vec<u8>, mut h: Header, payload: &[u8]) {
    h.payload_len = payload.len() as u32;
    h.crc = checksum(payload);
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
}

/// The replica's first frame on every connection (see `auth`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Challenge {
    /// 32 random bytes, hex.
    pub nonce: String,
    /// The replica has a secret: the Hello must prove it.
    pub auth: bool,
}

/// The client's answer to the challenge (see `auth`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub volume: String,
    pub size: u64,
    /// `engine` or `peer` (a replica pulling a rebuild).
    #[serde(default)]
    pub role: String,
    /// The engine's id, one per engine process (the lease is held by it).
    #[serde(default)]
    pub engine: String,
    /// 32 random bytes, hex.
    #[serde(default)]
    pub nonce: String,
    /// HMAC-SHA256 proof of the volume's secret, hex; empty without a secret.
    #[serde(default)]
    pub mac: String,
}

/// What a replica says about itself (reply to HELLO and INFO).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaInfo {
    pub volume: String,
    pub size: u64,
    pub sector_size: u64,
    pub revision: u64,
    /// The replica was not closed cleanly last time it was open.
    pub was_dirty: bool,
    /// The head may have changed since the replicas last agreed: the replica was opened
    /// dirty, or took writes after its last clean close or SETTLE. An engine that died with writes in
    /// flight on several connections can leave replicas that applied different ones at
    /// the same revision count, so a new engine must not serve two unsettled replicas
    /// as if they were equal (see the engine's `Volume::start`).
    #[serde(default)]
    pub unsettled: bool,
    pub head: String,
    pub parent: String,
    pub chain: Vec<String>,
    pub mode: String,
    /// volume.meta says a rebuild has not finished: the data is incomplete.
    #[serde(default)]
    pub rebuilding: bool,
    #[serde(default)]
    pub progress: Option<crate::rebuild::RebuildProgress>,
    /// The head holds data (written since the last snapshot).
    #[serde(default)]
    pub head_has_data: bool,
    /// The replica takes SHARE_MEMORY, WRITE_SHARED and READ_SHARED (see `shm`).
    #[serde(default)]
    pub shared_writes: bool,
    /// In the Hello reply: the replica's proof of the volume's secret (see `auth`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
}

/// SNAPSHOT, SNAPSHOT_REMOVE and SNAPSHOT_REVERT requests.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SnapshotRequest {
    pub name: String,
    #[serde(default)]
    pub user_created: bool,
    /// RFC 3339 UTC; the engine picks one time for all replicas.
    #[serde(default)]
    pub created: String,
    #[serde(default)]
    pub labels: Option<std::collections::HashMap<String, String>>,
    /// SNAPSHOT only: do the part that may run under live I/O, and stop before the commit.
    #[serde(default)]
    pub prepare: bool,
}

/// Encodes BLOCK_STATUS reply extents.
pub fn encode_extents(ext: &[(u32, bool)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ext.len() * 8);
    for &(len, hole) in ext {
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&(hole as u32).to_le_bytes());
    }
    v
}

pub fn decode_extents(p: &[u8]) -> Option<Vec<(u32, bool)>> {
    if p.len() % 8 != 0 {
        return None;
    }
    Some(
        p.chunks_exact(8)
            .map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]), c[4] & 1 != 0))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(h: Header, p: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_frame(&mut v, h, p);
        v
    }

    #[test]
    fn round_trip() {
        let mut h = Header::request(Op::Write, 77, 4096, 5);
        h.flags = FLAG_FUA;
        let v = frame(h, b"hello");
        let (d, p) = read_frame(&mut &v[..]).expect("decodes");
        assert_eq!(d.op, Op::Write);
        assert_eq!(d.id, 77);
        assert_eq!(d.offset, 4096);
        assert_eq!(d.count, 5);
        assert_eq!(d.flags, FLAG_FUA);
        assert_eq!(&p[..], b"hello");
    }

    /// The wire format names CRC32C: its published check value, and a frame of each
    /// size class the fast paths split on, against a bitwise reference.
    #[test]
    fn checksum_is_crc32c() {
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        let reference = |d: &[u8]| {
            let mut c = !0u32;
            for &b in d {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                }
            }
            !c
        };
        for len in [1usize, 7, 15, 16, 63, 64, 255, 256, 1000, 4096, 65_537] {
            let d: Vec<u8> = (0..len).map(|i| (i * 131 + len) as u8).collect();
            assert_eq!(checksum(&d), reference(&d), "length {len}");
        }
    }

    #[test]
    fn corrupt_payload_is_detected() {
        let mut v = frame(Header::request(Op::Write, 1, 0, 4), b"data");
        v[HEADER_LEN + 1] ^= 0x40;
        assert!(matches!(read_frame(&mut &v[..]), Err(FrameError::BadChecksum { .. })));
    }

    #[test]
    fn bad_magic_version_op_length() {
        let good = frame(Header::request(Op::Ping, 1, 0, 0), b"");
        let mut v = good.clone();
        v[0] = 0;
        assert!(matches!(read_frame(&mut &v[..]), Err(FrameError::BadMagic(_))));
        let mut v = good.clone();
        v[4] = 9;
        assert!(matches!(read_frame(&mut &v[..]), Err(FrameError::BadVersion(9))));
        let mut v = good.clone();
        v[5] = 200;
        assert!(matches!(read_frame(&mut &v[..]), Err(FrameError::BadOp(200))));
        let mut v = good;
        v[28..32].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(read_frame(&mut &v[..]), Err(FrameError::TooLong(_))));
    }

    #[test]
    fn truncated_frames() {
        let v = frame(Header::request(Op::Write, 1, 0, 4), b"data");
        assert!(matches!(read_frame(&mut &v[..10]), Err(FrameError::Closed)));
        assert!(read_frame(&mut &v[..HEADER_LEN + 2]).is_err());
    }

    /// Untrusted bytes: random and mutated frames must decode or fail, never panic,
    /// and a frame that decodes must carry a payload matching its checksum.
    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut good = Vec::new();
        put_frame(&mut good, Header::request(Op::Write, 5, 4096, 16), &[7u8; 16]);
        for i in 0..200_000u32 {
            let mut v = if i % 2 == 0 {
                good.clone()
            } else {
                (0..(next() % 96) as usize).map(|_| next() as u8).collect()
            };
            if !v.is_empty() {
                for _ in 0..(next() % 4) {
                    let at = (next() % v.len() as u64) as usize;
                    v[at] = next() as u8;
                }
                if next() % 8 == 0 {
                    v.truncate((next() % v.len() as u64) as usize);
                }
            }
            if let Ok((h, p)) = read_frame(&mut &v[..]) {
                assert_eq!(checksum(&p), h.crc);
                assert_eq!(p.len(), h.payload_len as usize);
            }
        }
    }

    /// Feeds `stream` to an assembler in pieces of the given sizes (cycled) and returns
    /// what came out, stopping at the first error.
    fn assemble(stream: &[u8], pieces: &[usize]) -> (Vec<(Header, Bytes)>, Option<FrameError>) {
        let mut a = Assembler::new();
        let (mut out, mut at, mut k) = (Vec::new(), 0usize, 0usize);
        loop {
            while let Some(f) = a.next() {
                match f {
                    Ok(f) => out.push(f),
                    Err(e) => return (out, Some(e)),
                }
            }
            if at == stream.len() {
                return (out, None);
            }
            let spare = a.spare();
            let n = pieces[k % pieces.len()].min(spare.len()).min(stream.len() - at);
            k += 1;
            for (d, s) in spare[..n].iter_mut().zip(&stream[at..at + n]) {
                d.write(*s);
            }
            // SAFETY: the first n bytes of spare were just written.
            unsafe { a.filled(n) };
            at += n;
        }
    }

    #[test]
    fn assembler_cuts_frames_however_the_bytes_arrive() {
        let mut stream = Vec::new();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let frames: Vec<(Header, Vec<u8>)> = vec![
            (Header::request(Op::Write, 1, 0, 0), vec![]),
            (Header::request(Op::Read, 2, 4096, 4096), vec![9u8; 4096]),
            (Header::request(Op::Read, 3, 0, big.len() as u32), big.clone()),
            (Header::request(Op::Flush, 4, 0, 0), vec![]),
            (Header::request(Op::Read, 5, 0, 5), b"tail!".to_vec()),
        ];
        for (h, p) in &frames {
            put_frame(&mut stream, *h, p);
        }
        for pieces in [&[1usize][..], &[7, 40, 3], &[65536], &[1 << 20], &[39, 41, 4095, 100_000]] {
            let (out, err) = assemble(&stream, pieces);
            assert!(err.is_none(), "pieces {pieces:?}: {err:?}");
            assert_eq!(out.len(), frames.len(), "pieces {pieces:?}");
            for ((h, p), (want_h, want_p)) in out.iter().zip(&frames) {
                assert_eq!(h.id, want_h.id);
                assert_eq!(&p[..], &want_p[..], "frame {} with pieces {pieces:?}", h.id);
            }
        }
        // Half a frame is not a frame.
        let (out, err) = assemble(&stream[..stream.len() - 1], &[4096]);
        assert_eq!(out.len(), frames.len() - 1);
        assert!(err.is_none());
    }

    #[test]
    fn assembler_reports_damage_where_it_is() {
        let mut stream = Vec::new();
        put_frame(&mut stream, Header::request(Op::Read, 1, 0, 4), b"good");
        let first = stream.len();
        put_frame(&mut stream, Header::request(Op::Read, 2, 0, 4), b"data");
        stream[first + HEADER_LEN] ^= 1;
        let (out, err) = assemble(&stream, &[5]);
        assert_eq!(out.len(), 1);
        assert!(matches!(err, Some(FrameError::BadChecksum { id: 2, .. })), "{err:?}");
        stream[first] = 0;
        let (_, err) = assemble(&stream, &[5]);
        assert!(matches!(err, Some(FrameError::BadMagic(_))), "{err:?}");
        let mut v = Vec::new();
        put_frame(&mut v, Header::request(Op::Read, 1, 0, 0), b"");
        v[28..32].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        // A length past the limit is refused from the header alone, with no room made for it.
        let (_, err) = assemble(&v, &[HEADER_LEN]);
        assert!(matches!(err, Some(FrameError::TooLong(_))), "{err:?}");
    }

    #[test]
    fn extents_round_trip() {
        let e = vec![(4096, false), (8192, true)];
        assert_eq!(decode_extents(&encode_extents(&e)), Some(e));
        assert_eq!(decode_extents(&[1, 2, 3]), None);
    }
}
