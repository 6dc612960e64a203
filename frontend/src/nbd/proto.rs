//! NBD wire protocol: constants and the few fixed-layout messages the server encodes
//! or decodes.
//!
//! Reference: `doc/proto.md` of the NetworkBlockDevice/nbd project (fixed newstyle
//! negotiation, the INFO, STRUCTURED_REPLY, WRITE_ZEROES and BLOCK_STATUS extensions,
//! which are all part of the main specification today).
//!
//! Layout and invariants, and why they hold:
//!
//! - **Everything is big-endian** ("network byte order"), and no message has padding.
//!   The encoders below only use `BufMut::put_u*` (big-endian) so no host-order value
//!   can leak onto the wire.
//! - **The handshake** is: server greeting (`NBDMAGIC`, `IHAVEOPT`, 16-bit handshake
//!   flags), 32-bit client flags, then options. Each option is `IHAVEOPT`, 32-bit option
//!   number, 32-bit length, `length` bytes. Because every option carries its length, the
//!   server can always skip an option it does not understand and answer
//!   `NBD_REP_ERR_UNSUP` instead of dropping the client: that is the whole point of
//!   "fixed" newstyle. The length is attacker-controlled, hence [`MAX_OPTION_LEN`]: data
//!   beyond it is discarded without being buffered.
//! - **Option replies** are `OPT_REPLY_MAGIC`, the option number echoed, a 32-bit reply
//!   type and a 32-bit length. Error reply types have bit 31 set so that a client can
//!   recognise an error it does not know by name.
//! - **`NBD_OPT_EXPORT_NAME` has no reply header**: the server answers with the export
//!   size, the transmission flags and (unless `NO_ZEROES` was agreed) 124 zero bytes, and
//!   it cannot report an error other than by closing the connection. `NBD_OPT_GO` exists
//!   to fix exactly that, so modern clients use it.
//! - **A request** is exactly [`REQUEST_HEADER_LEN`] (28) bytes, followed by a payload
//!   only for `NBD_CMD_WRITE` (we never negotiate extended headers, which would change
//!   this). So after a well-formed header we always know how many bytes belong to the
//!   request; after a bad magic we do not, and the stream can no longer be parsed: the
//!   only safe reaction is to close the connection.
//! - **Replies carry the client's 64-bit handle** unchanged; that is the only thing
//!   that ties a reply to its request, since replies may be sent in any order.
//! - **A simple reply** (16 bytes) cannot say how much data follows: the client infers
//!   it from the request. Hence a failed READ must not send any data after an error
//!   header, and a successful READ must send exactly the requested length.
//! - **A structured reply chunk** (20-byte header) carries its own payload length, so
//!   the stream stays self-describing; once structured replies are negotiated, a READ
//!   MUST be answered with structured chunks and errors can carry a message. Every
//!   structured reply ends with a chunk that has [`NBD_REPLY_FLAG_DONE`].
//! - **Error numbers on the wire are NBD's own** (which happen to match Linux errno
//!   values for the few that exist); any other errno must be mapped, see [`nbd_errno`].

use bytes::BufMut;

// ---- Handshake -----------------------------------------------------------------------

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second 8 bytes of the greeting, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply in fixed newstyle negotiation.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server -> client, 16 bits).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// What this server advertises.
pub const HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/// Client flags (client -> server, 32 bits). Any other bit means the client expects
/// something we did not offer, and the spec requires us to drop the connection.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
pub const KNOWN_CLIENT_FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// Option numbers.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
const NBD_REP_ERR_BIT: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_ERR_BIT | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_ERR_BIT | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_ERR_BIT | 3;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_ERR_BIT | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_ERR_BIT | 7;

/// `NBD_REP_INFO` item types (first 16 bits of the reply data).
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Option data larger than this is never buffered. Legitimate options are tiny (strings
/// are at most 4096 bytes by the spec), so this only stops abuse.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;

/// The one metadata context we serve, and the id we give it in `SET_META_CONTEXT`.
/// Ids are chosen by the server; 0 is reserved for the (meaningless) ids of
/// `LIST_META_CONTEXT` replies, so the real one is non-zero to catch client mix-ups.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

// ---- Block sizes ---------------------------------------------------------------------

/// Any byte range is valid (the engine has no alignment constraints).
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Replicas work in 4 KiB blocks, so smaller or unaligned writes cost a read-modify-write.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest READ/WRITE payload we accept. It bounds the memory one request can pin, and
/// is what qemu and nbdkit use too, so clients already split their I/O to fit.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

// ---- Transmission --------------------------------------------------------------------

/// Transmission flags (16 bits).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// What this server advertises. CAN_MULTI_CONN is honest because the engine has no
/// per-session cache: a flush covers every write completed on any session.
pub const TRANSMISSION_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_CAN_MULTI_CONN;

pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// magic(4) flags(2) type(2) handle(8) offset(8) length(4)
pub const REQUEST_HEADER_LEN: usize = 28;
/// magic(4) error(4) handle(8)
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// magic(4) flags(2) type(2) handle(8) length(4)
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;

/// Commands.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and types.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` status flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Error values allowed on the wire.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Map a Linux errno (as the engine reports it) to an NBD error value. The protocol
/// only defines a handful; everything else becomes EIO, except that the spec asks
/// for EDQUOT/EFBIG to be reported as ENOSPC.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// One parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Decode a request header. `Err(magic)` if the magic is wrong, in which case the
    /// rest of the header is meaningless.
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, u32> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != NBD_REQUEST_MAGIC {
            return Err(magic);
        }
        let mut h = [0u8; 8];
        h.copy_from_slice(&b[8..16]);
        let mut o = [0u8; 8];
        o.copy_from_slice(&b[16..24]);
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            typ: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes(h),
            offset: u64::from_be_bytes(o),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Encode (used by tests and tools that speak the client side).
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(NBD_REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.typ);
        buf.put_u64(self.handle);
        buf.put_u64(self.offset);
        buf.put_u32(self.len);
    }
}

/// Option reply header; `len` bytes of data must follow.
pub fn put_opt_reply_header(buf: &mut impl BufMut, opt: u32, reply_type: u32, len: u32) {
    buf.put_u64(OPT_REPLY_MAGIC);
    buf.put_u32(opt);
    buf.put_u32(reply_type);
    buf.put_u32(len);
}

/// A whole option reply with its data.
pub fn put_opt_reply(buf: &mut impl BufMut, opt: u32, reply_type: u32, data: &[u8]) {
    // Option replies we build are tiny (bounded by MAX_STRING_LEN-sized strings).
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    put_opt_reply_header(buf, opt, reply_type, len);
    buf.put_slice(data);
}

/// Simple reply header; for a successful READ, the data follows.
pub fn put_simple_reply(buf: &mut impl BufMut, handle: u64, error: u32) {
    buf.put_u32(NBD_SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(handle);
}

/// Structured reply chunk header; `len` bytes of payload must follow.
pub fn put_structured_header(buf: &mut impl BufMut, flags: u16, typ: u16, handle: u64, len: u32) {
    buf.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(typ);
    buf.put_u64(handle);
    buf.put_u32(len);
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a human-readable message.
pub fn put_structured_error(buf: &mut impl BufMut, handle: u64, error: u32, msg: &str) {
    // The message length field is 16 bits; keep messages short anyway.
    let msg = truncate_utf8(msg, 1024);
    put_structured_header(
        buf,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    );
    buf.put_u32(error);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg.as_bytes());
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Name of an option, for logs.
pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        4 => "NBD_OPT_PEEK_EXPORT",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Name of a command, for logs.
pub fn cmd_name(typ: u16) -> &'static str {
    match typ {
        NBD_CMD_READ => "READ",
        NBD_CMD_WRITE => "WRITE",
        NBD_CMD_DISC => "DISC",
        NBD_CMD_FLUSH => "FLUSH",
        NBD_CMD_TRIM => "TRIM",
        NBD_CMD_CACHE => "CACHE",
        NBD_CMD_WRITE_ZEROES => "WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: NBD_CMD_FLAG_FUA,
            typ: NBD_CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let mut v = Vec::new();
        r.encode(&mut v);
        assert_eq!(v.len(), REQUEST_HEADER_LEN);
        let arr: [u8; REQUEST_HEADER_LEN] = v.as_slice().try_into().expect("28 bytes");
        assert_eq!(Request::parse(&arr), Ok(r));
        let mut bad = arr;
        bad[0] ^= 0xff;
        assert!(Request::parse(&bad).is_err());
    }

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_errno(libc::EIO), NBD_EIO);
        assert_eq!(nbd_errno(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(nbd_errno(libc::ESHUTDOWN), NBD_ESHUTDOWN);
        assert_eq!(nbd_errno(libc::ENOTSUP), NBD_ENOTSUP);
        assert_eq!(nbd_errno(libc::ETIMEDOUT), NBD_EIO);
        assert_eq!(nbd_errno(-3), NBD_EIO);
    }

    #[test]
    fn structured_error_layout() {
        let mut v = Vec::new();
        put_structured_error(&mut v, 7, NBD_EINVAL, "bad");
        assert_eq!(v.len(), STRUCTURED_REPLY_HEADER_LEN + 6 + 3);
        assert_eq!(&v[0..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&v[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&v[6..8], &NBD_REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&v[16..20], &9u32.to_be_bytes());
        assert_eq!(&v[20..24], &NBD_EINVAL.to_be_bytes());
        assert_eq!(&v[24..26], &3u16.to_be_bytes());
        assert_eq!(&v[26..], b"bad");
    }

    #[test]
    fn truncate_on_char_boundary() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
