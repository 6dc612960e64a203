//! Who may talk to a replica: the handshake that opens every connection.
//!
//! # Rules
//!
//! - Each volume has a secret: 32 random bytes, kept as 64 hex digits in a file of mode
//!   0600 that whoever starts the volume (`longhorn up`, the manager) gives to its
//!   replicas and its engine (`--secret-file`). The secret never crosses the wire.
//! - The replica speaks first: a CHALLENGE (a `Hello` reply frame, id 0) carrying a
//!   fresh random nonce and whether it requires proof.
//! - The client answers with its `Hello`: volume, size, role, engine id, a nonce of its
//!   own, and `mac = HMAC-SHA256(secret, "longhorn-hello" | replica nonce | client nonce |
//!   volume | size | role | engine id)`, every part length-prefixed so no two transcripts
//!   read alike. The replica recomputes it and compares in constant time; a wrong or
//!   missing proof is refused (EACCES) before anything else is read.
//! - The replica's reply carries `mac = HMAC(secret, "longhorn-welcome" | client nonce |
//!   replica nonce | volume)`, which the client checks: an engine never writes to, and a
//!   rebuild never copies from, a process that does not hold the volume's secret.
//! - Without a secret a replica accepts clients without proof; it may then listen on
//!   loopback only (the CLI refuses anything else). A client that has a secret refuses a
//!   replica that cannot prove it has it too.
//! - Roles: `engine` (reads, writes, chain changes; subject to the engine lease, see
//!   `server`) and `peer` (another replica copying a rebuild: the read-only rebuild ops
//!   and INFO only).
//! - The handshake must complete within [`HANDSHAKE_TIMEOUT`].

use crate::proto::{self, Challenge, Header, Hello, Op, ReplicaInfo};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::io::{self, Write};
use crate::net::Stream;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const ROLE_ENGINE: &str = "engine";
pub const ROLE_PEER: &str = "peer";
const NONCE_LEN: usize = 32;

/// A volume's secret.
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Reads a secret file: 64 hex digits, readable by its owner only.
    pub fn load(path: &Path) -> Result<Key, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!("secret file {} has mode {mode:o}: others may read it; chmod 600 it", path.display()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
        let b = unhex(text.trim()).filter(|b| b.len() == 32).ok_or_else(|| {
            format!("secret file {} must hold 64 hex digits (32 bytes)", path.display())
        })?;
        let mut k = [0u8; 32];
        k.copy_from_slice(&b);
        Ok(Key(k))
    }

    /// Makes a new random secret file (mode 0600), refusing to replace one.
    pub fn generate(path: &Path) -> Result<Key, String> {
        let mut k = [0u8; 32];
        fill_random(&mut k).map_err(|e| format!("random bytes for a secret: {e}"))?;
        Key::write_new(path, &k)?;
        Ok(Key(k))
    }

    /// A secret given as text (64 hex digits, as its file holds it), e.g. by the host
    /// that made it for the volume's replicas on other hosts.
    pub fn parse(text: &str) -> Option<Key> {
        let b = unhex(text.trim()).filter(|b| b.len() == 32)?;
        let mut k = [0u8; 32];
        k.copy_from_slice(&b);
        Some(Key(k))
    }

    /// The secret as its file holds it.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Writes this secret to a new file (mode 0600), refusing to replace one.
    pub fn store_new(&self, path: &Path) -> Result<(), String> {
        Key::write_new(path, &self.0)
    }

    fn write_new(path: &Path, k: &[u8; 32]) -> Result<(), String> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("secret file {}: {e}", path.display()))?;
        f.write_all(format!("{}\n", hex(k)).as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("secret file {}: {e}", path.display()))
    }

    /// The secret in `path`, made first if there is none.
    pub fn load_or_generate(path: &Path) -> Result<Key, String> {
        if path.exists() {
            Key::load(path)
        } else {
            Key::generate(path)
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // A 32-byte key is always a valid HMAC key.
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        for p in parts {
            m.update(&(p.len() as u32).to_le_bytes());
            m.update(p);
        }
        m
    }

    fn sign(&self, parts: &[&[u8]]) -> String {
        hex(&self.mac(parts).finalize().into_bytes())
    }

    /// Constant-time check of `got` (hex) against the MAC of `parts`.
    fn verify(&self, parts: &[&[u8]], got: &str) -> bool {
        match unhex(got) {
            Some(tag) => self.mac(parts).verify_slice(&tag).is_ok(),
            None => false,
        }
    }
}

fn hello_parts<'a>(replica_nonce: &'a str, h: &'a Hello, size: &'a [u8; 8]) -> [&'a [u8]; 7] {
    [
        b"longhorn-hello",
        replica_nonce.as_bytes(),
        h.nonce.as_bytes(),
        h.volume.as_bytes(),
        size,
        h.role.as_bytes(),
        h.engine.as_bytes(),
    ]
}

fn welcome_parts<'a>(client_nonce: &'a str, replica_nonce: &'a str, volume: &'a str) -> [&'a [u8]; 4] {
    [b"longhorn-welcome", client_nonce.as_bytes(), replica_nonce.as_bytes(), volume.as_bytes()]
}

/// The replica's side: a new challenge.
pub fn challenge(key: Option<&Key>) -> io::Result<Challenge> {
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n)?;
    Ok(Challenge { nonce: hex(&n), auth: key.is_some() })
}

/// The replica's side: whether `h` proves the secret for challenge `c`.
pub fn check_hello(key: &Key, c: &Challenge, h: &Hello) -> bool {
    let size = h.size.to_le_bytes();
    h.nonce.len() == 2 * NONCE_LEN && key.verify(&hello_parts(&c.nonce, h, &size), &h.mac)
}

/// The replica's side: its proof for the reply to `h`.
pub fn welcome_mac(key: &Key, c: &Challenge, h: &Hello) -> String {
    key.sign(&welcome_parts(&h.nonce, &c.nonce, &h.volume))
}

/// What a client presents.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub key: Option<std::sync::Arc<Key>>,
    /// `engine` or `peer`.
    pub role: String,
    /// The engine's id (random, one per engine process); empty for a peer.
    pub engine: String,
}

impl Credentials {
    pub fn engine(key: Option<std::sync::Arc<Key>>, id: &str) -> Credentials {
        Credentials { key, role: ROLE_ENGINE.into(), engine: id.into() }
    }
    pub fn peer(key: Option<std::sync::Arc<Key>>) -> Credentials {
        Credentials { key, role: ROLE_PEER.into(), engine: String::new() }
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Frame(#[from] proto::FrameError),
    /// The replica said no (wrong volume, failed proof, another engine holds it).
    #[error("refused: {reason}")]
    Refused { errno: u32, reason: String },
    /// The replica did not prove it holds the secret, or spoke out of turn.
    #[error("{0}")]
    Untrusted(String),
}

impl HandshakeError {
    pub fn into_io(self, addr: &str) -> io::Error {
        let kind = match &self {
            HandshakeError::TimedOut(_) => io::ErrorKind::TimedOut,
            // Another engine holds the replica (see `server`): a state, not a verdict.
            HandshakeError::Refused { errno, .. } if *errno == libc::EBUSY as u32 => io::ErrorKind::ResourceBusy,
            HandshakeError::Refused { .. } | HandshakeError::Untrusted(_) => io::ErrorKind::PermissionDenied,
            HandshakeError::Frame(proto::FrameError::Io(e)) => e.kind(),
            HandshakeError::Frame(_) => io::ErrorKind::ConnectionAborted,
        };
        io::Error::new(kind, format!("replica {addr}: handshake: {self}"))
    }
}

fn read_frame_timed(s: &mut Stream) -> Result<(Header, bytes::Bytes), HandshakeError> {
    proto::read_frame(s).map_err(|e| match e {
        proto::FrameError::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            HandshakeError::TimedOut(HANDSHAKE_TIMEOUT)
        }
        e => HandshakeError::Frame(e),
    })
}

/// The client's side, on a fresh connection: reads the challenge, sends the Hello,
/// checks the reply. Leaves the stream's read timeout at [`HANDSHAKE_TIMEOUT`].
pub fn client_handshake(s: &mut Stream, volume: &str, size: u64, creds: &Credentials) -> Result<ReplicaInfo, HandshakeError> {
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| HandshakeError::Frame(e.into()))?;
    let (h, p) = read_frame_timed(s)?;
    if h.op != Op::Hello || !h.is_reply() {
        return Err(HandshakeError::Untrusted(format!("expected a challenge, got {:?}", h.op)));
    }
    let c: Challenge = serde_json::from_slice(&p).map_err(|e| HandshakeError::Untrusted(format!("bad challenge: {e}")))?;
    if creds.key.is_some() && !c.auth {
        return Err(HandshakeError::Untrusted("the replica has no secret, so it cannot prove it is this volume's replica".into()));
    }
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n).map_err(|e| HandshakeError::Frame(e.into()))?;
    let mut hello = Hello {
        volume: volume.to_string(),
        size,
        role: creds.role.clone(),
        engine: creds.engine.clone(),
        nonce: hex(&n),
        mac: String::new(),
    };
    if let Some(k) = &creds.key {
        let sz = size.to_le_bytes();
        hello.mac = k.sign(&hello_parts(&c.nonce, &hello, &sz));
    }
    let body = serde_json::to_vec(&hello).map_err(|e| HandshakeError::Untrusted(format!("encoding Hello: {e}")))?;
    let mut b = Vec::new();
    proto::put_frame(&mut b, Header::request(Op::Hello, 0, 0, 0), &body);
    s.write_all(&b).map_err(|e| HandshakeError::Frame(e.into()))?;
    let (h, p) = read_frame_timed(s)?;
    if h.status != 0 {
        return Err(HandshakeError::Refused { errno: h.status, reason: String::from_utf8_lossy(&p).to_string() });
    }
    let info: ReplicaInfo = serde_json::from_slice(&p).map_err(|e| HandshakeError::Untrusted(format!("bad Hello reply: {e}")))?;
    if let Some(k) = &creds.key {
        if !k.verify(&welcome_parts(&hello.nonce, &c.nonce, volume), &info.mac) {
            return Err(HandshakeError::Untrusted("the replica's proof of the volume's secret is wrong".into()));
        }
    }
    if info.volume != volume || info.size != size {
        return Err(HandshakeError::Untrusted(format!(
            "the replica serves volume {:?} of {} bytes, not {volume:?} of {size}",
            info.volume, info.size
        )));
    }
    Ok(info)
}

pub fn fill_random(b: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < b.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n = unsafe { libc::getrandom(b[done..].as_mut_ptr() as *mut libc::c_void, b.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// A random id: 16 bytes in hex.
pub fn random_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    fill_random(&mut b)?;
    Ok(hex(&b))
}

pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|c| {
            let v = |x: u8| (x as char).to_digit(16);
            Some((v(c[0])? * 16 + v(c[1])?) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(c: &Challenge, k: Option<&Key>) -> Hello {
        let mut h = Hello {
            volume: "vol1".into(),
            size: 4096,
            role: ROLE_ENGINE.into(),
            engine: "e1".into(),
            nonce: hex(&[7u8; NONCE_LEN]),
            mac: String::new(),
        };
        if let Some(k) = k {
            let sz = h.size.to_le_bytes();
            h.mac = k.sign(&hello_parts(&c.nonce, &h, &sz));
        }
        h
    }

    #[test]
    fn proofs_bind_the_secret_the_nonces_and_every_field() {
        let k = Key([1u8; 32]);
        let other = Key([2u8; 32]);
        let c = challenge(Some(&k)).expect("challenge");
        let h = hello(&c, Some(&k));
        assert!(check_hello(&k, &c, &h));
        assert!(!check_hello(&other, &c, &h), "another volume's secret");
        let c2 = challenge(Some(&k)).expect("challenge");
        assert!(!check_hello(&k, &c2, &h), "a replayed Hello does not answer a new challenge");
        for tamper in [
            |h: &mut Hello| h.volume = "vol2".into(),
            |h: &mut Hello| h.size = 8192,
            |h: &mut Hello| h.role = ROLE_PEER.into(),
            |h: &mut Hello| h.engine = "e2".into(),
            |h: &mut Hello| h.mac = String::new(),
            |h: &mut Hello| h.mac = "zz".into(),
        ] {
            let mut t = h.clone();
            tamper(&mut t);
            assert!(!check_hello(&k, &c, &t), "a tampered Hello passed: {t:?}");
        }
        assert!(!check_hello(&k, &c, &hello(&c, None)), "no proof at all");
    }

    #[test]
    fn secret_files() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("key");
        let k = Key::generate(&p).expect("generate");
        assert_eq!(std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
        assert_eq!(Key::load(&p).expect("load").0, k.0);
        assert!(Key::generate(&p).is_err(), "never replaced");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(Key::load(&p).expect_err("readable by others").contains("chmod 600"));
        std::fs::write(d.path().join("short"), "abcd").expect("w");
        std::fs::set_permissions(d.path().join("short"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(Key::load(&d.path().join("short")).is_err());
    }
}
