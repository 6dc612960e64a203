//! The replica protocol: the frame decoder both ends use on the other's bytes, and the
//! JSON payloads of the handshake (Hello, and the ReplicaInfo it is answered with) and
//! of snapshot requests.

use longhorn_replica::proto::{
    checksum, decode_extents, Assembler, encode_extents, put_frame, read_frame, FrameError, Header, Hello, Op, ReplicaInfo,
    SnapshotRequest, HEADER_LEN, MAX_PAYLOAD,
};
use longhorn_replica::shm::{Attach, Descriptor, Mapping, Pool};
use serde::de::DeserializeOwned;
use std::sync::{Arc, OnceLock};
use serde::Serialize;

/// A stream of frames, decoded as a connection would until the first error. Every
/// frame that decodes is within its declared limits, carries a payload matching its
/// CRC, and encodes back to exactly the bytes it came from.
pub fn replica_frame(data: &[u8]) {
    let mut rest = data;
    let mut seen = Vec::new();
    loop {
        let before = rest;
        let (h, payload) = match read_frame(&mut rest) {
            Ok(f) => f,
            Err(FrameError::Closed) => {
                assert!(before.len() < HEADER_LEN, "Closed with a whole header left");
                return assembled_alike(data, &seen, false);
            }
            // A payload cut short: the stream ends inside a frame.
            Err(FrameError::Io(_)) => return assembled_alike(data, &seen, false),
            Err(_) => return assembled_alike(data, &seen, true),
        };
        seen.push((h, payload.clone()));
        let used = before.len() - rest.len();
        assert_eq!(used, HEADER_LEN + h.payload_len as usize);
        assert!(h.payload_len <= MAX_PAYLOAD);
        assert_eq!(payload.len(), h.payload_len as usize);
        assert_eq!(checksum(&payload), h.crc);
        assert_eq!(&h.encode()[..], &before[..HEADER_LEN], "decode(encode(header)) differs");
        let hb: &[u8; HEADER_LEN] = before[..HEADER_LEN].try_into().expect("header length");
        assert_eq!(Header::decode(hb).expect("decodes again"), h);
        let mut again = Vec::new();
        put_frame(&mut again, h, &payload);
        assert_eq!(&again[..], &before[..used], "put_frame of a decoded frame differs");
        match h.op {
            Op::BlockStatus if h.is_reply() => {
                if let Some(ext) = decode_extents(&payload) {
                    assert_eq!(encode_extents(&ext).len(), payload.len());
                    assert_eq!(decode_extents(&encode_extents(&ext)), Some(ext));
                }
            }
            Op::Hello if !h.is_reply() => json_round_trip::<Hello>(&payload, |a, b| a.volume == b.volume && a.size == b.size),
            Op::Hello => json_round_trip::<ReplicaInfo>(&payload, |a, b| a == b),
            Op::Snapshot | Op::SnapshotRemove | Op::SnapshotRevert if !h.is_reply() => snapshot_request(&payload),
            Op::ShareMemory if !h.is_reply() => json_round_trip::<Attach>(&payload, |a, b| a == b),
            Op::WriteShared | Op::ReadShared => shared_descriptor(h.count, &payload),
            _ => {}
        }
    }
}

/// The same bytes through the `Assembler` a multiplexing reader uses, arriving in
/// pieces whose sizes the bytes themselves choose: the same frames come out, and it
/// reports damage exactly where `read_frame` did (a stream that merely ends is not
/// damage: the rest may still come).
fn assembled_alike(data: &[u8], want: &[(Header, bytes::Bytes)], damaged: bool) {
    let mut a = Assembler::new();
    let (mut got, mut at, mut k) = (Vec::new(), 0usize, 0usize);
    let mut err = None;
    'feed: loop {
        while let Some(f) = a.next() {
            match f {
                Ok(f) => got.push(f),
                Err(e) => {
                    err = Some(e);
                    break 'feed;
                }
            }
        }
        if at == data.len() {
            break;
        }
        let piece = 1 + data.get(k % data.len()).copied().unwrap_or(0) as usize * 97;
        k += 1;
        let spare = a.spare();
        let n = piece.min(spare.len()).min(data.len() - at);
        for (d, s) in spare[..n].iter_mut().zip(&data[at..at + n]) {
            d.write(*s);
        }
        // SAFETY: the first n bytes of spare were just written.
        unsafe { a.filled(n) };
        at += n;
    }
    assert_eq!(err.is_some(), damaged, "assembler error {err:?}");
    assert_eq!(got.len(), want.len());
    for ((h, p), (wh, wp)) in got.iter().zip(want) {
        assert_eq!(h, wh);
        assert_eq!(p, wp);
    }
}

/// A WRITE_SHARED or READ_SHARED descriptor against a real pool, as a replica and an
/// engine resolve it: accepted only inside the pool, and what decodes encodes back.
fn shared_descriptor(count: u32, payload: &[u8]) {
    static POOL: OnceLock<Option<(Arc<Pool>, Arc<Mapping>)>> = OnceLock::new();
    let Some((pool, map)) = POOL.get_or_init(|| {
        let p = Arc::new(Pool::new(1 << 20).ok()?);
        let m = Mapping::open(&p.attach()).ok()?;
        Some((p, m))
    }) else {
        return;
    };
    let Ok(d) = Descriptor::decode(payload) else {
        assert!(map.payload(count, payload).is_err() && map.region(count, payload).is_err());
        return;
    };
    assert_eq!(&d.encode()[..], payload);
    let inside = d.offset.checked_add(count as u64).is_some_and(|e| e <= 1 << 20);
    if let Ok(b) = map.payload(count, payload) {
        assert!(inside && b.len() == count as usize && checksum(&b) == d.crc);
    }
    assert_eq!(map.region(count, payload).is_ok(), inside);
    // An engine given this as a READ_SHARED reply for a request it never lent for.
    assert!(pool.take(u64::MAX, 0, count, payload).is_err());
}

/// decode(encode(x)) == x for a payload that decodes.
fn json_round_trip<T: Serialize + DeserializeOwned>(payload: &[u8], same: impl Fn(&T, &T) -> bool) {
    let Ok(v) = serde_json::from_slice::<T>(payload) else { return };
    let enc = serde_json::to_vec(&v).expect("a decoded value encodes");
    let back: T = serde_json::from_slice(&enc).expect("what we encode decodes");
    assert!(same(&v, &back), "JSON round trip changed the value");
}

fn snapshot_request(payload: &[u8]) {
    json_round_trip::<SnapshotRequest>(payload, |a, b| {
        (&a.name, a.user_created, &a.created, &a.labels, a.prepare) == (&b.name, b.user_created, &b.created, &b.labels, b.prepare)
    });
}

/// The handshake payloads alone: the engine's Hello as the replica parses it, and the
/// replica's ReplicaInfo as the engine parses it, and a snapshot request.
pub fn replica_hello(data: &[u8]) {
    json_round_trip::<Hello>(data, |a, b| a.volume == b.volume && a.size == b.size);
    json_round_trip::<ReplicaInfo>(data, |a, b| a == b);
    snapshot_request(data);
}
