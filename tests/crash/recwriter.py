#!/usr/bin/python3
"""Writer of acknowledged records for the crash harness (tests/src/crash.rs).

Writes 4 KiB records into slots of a region of an NBD export, each one either with
FUA or as a plain write made durable by a later FLUSH, and keeps a log outside the
volume, fsynced:

    I seq slot crc fua   intent, written and fsynced BEFORE the write is sent
    A seq                the write was acknowledged
    E seq errno          the write failed
    S fid                a FLUSH is sent; it covers every write whose A line is above
    F fid                that FLUSH was acknowledged
    X fid errno          that FLUSH failed
    Q                    the writer stopped cleanly

A record: magic "LHREC001", slot (u64 LE), seq (u64 LE), CRC-32 (IEEE, zlib's) of the
whole record computed with this field zero, 4 bytes zero, random bytes to 4 KiB.

Up to --depth writes are in flight at once, never two to the same slot, so the log
says exactly which writes may have reached a slot. The writer stops at the first
error (the engine died, or I/O failed: the harness decides whether that was allowed),
when --stop-file appears, or after --max-writes.

Prints "warm" once --warm writes were acknowledged, and a summary line at the end:
"done writes=N acked=M errors=K".
"""

import argparse
import faulthandler
import os
import random
import signal
import struct
import sys
import time
import zlib

import nbd

REC = 4096
MAGIC = b"LHREC001"


def record(slot, seq, rnd):
    body = bytearray(REC)
    body[0:8] = MAGIC
    struct.pack_into("<QQ", body, 8, slot, seq)
    body[32:] = rnd.randbytes(REC - 32)
    crc = zlib.crc32(body) & 0xFFFFFFFF
    struct.pack_into("<I", body, 24, crc)
    return bytes(body), crc


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)
        self.dirty = False

    def line(self, s):
        self.f.write(s + "\n")
        self.dirty = True

    def sync(self):
        if self.dirty:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.dirty = False


def errno_of(e):
    return getattr(e, "errnum", None) or 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--uri", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--base", type=int, required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--seq-start", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--fua-percent", type=int, default=50)
    p.add_argument("--flush-every", type=int, default=8)
    p.add_argument("--max-writes", type=int, default=1 << 40)
    p.add_argument("--warm", type=int, default=20)
    p.add_argument("--stop-file", default="")
    a = p.parse_args()
    # SIGUSR1 prints where the writer is (a stuck round is then explained in its log).
    faulthandler.register(signal.SIGUSR1)

    rnd = random.Random(a.seed)
    log = Log(a.log)
    h = nbd.NBD()
    h.connect_uri(a.uri)
    print("connected", flush=True)

    seq = a.seq_start
    inflight = {}  # cookie -> ("w", seq, slot) | ("f", fid)
    busy = set()  # slots with a write in flight
    plain_since_flush = 0
    fid = 0
    writes = acked = errors = 0
    warm_said = False
    stop = False
    bufs = {}

    def submit_flush():
        nonlocal fid, plain_since_flush
        fid += 1
        log.line(f"S {fid}")
        log.sync()
        c = h.aio_flush()
        inflight[c] = ("f", fid)
        plain_since_flush = 0

    while True:
        if not stop:
            if a.stop_file and os.path.exists(a.stop_file):
                stop = True
            if writes >= a.max_writes:
                stop = True
        # Fill the queue with writes (and, every so many plain writes, a FLUSH).
        batch = []
        while not stop and len(inflight) + len(batch) < a.depth and writes < a.max_writes:
            slot = rnd.randrange(a.slots)
            if slot in busy:
                continue
            seq += 1
            fua = rnd.randrange(100) < a.fua_percent
            data, crc = record(slot, seq, rnd)
            log.line(f"I {seq} {slot} {crc} {1 if fua else 0}")
            batch.append((seq, slot, data, fua))
            busy.add(slot)
            writes += 1
        if batch:
            # The intents are on disk before any of these writes is sent.
            log.sync()
            for (s, slot, data, fua) in batch:
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                c = h.aio_pwrite(buf, a.base + slot * REC, flags=nbd.CMD_FLAG_FUA if fua else 0)
                bufs[c] = buf
                inflight[c] = ("w", s, slot)
                if not fua:
                    plain_since_flush += 1
        if not inflight:
            if stop:
                break
            continue
        try:
            h.poll(1000)
        except nbd.Error as e:
            # The connection is gone: every command in flight failed.
            for c, what in inflight.items():
                if what[0] == "w":
                    log.line(f"E {what[1]} {errno_of(e) or 107}")
                    errors += 1
                else:
                    log.line(f"X {what[1]} {errno_of(e) or 107}")
                    errors += 1
            inflight.clear()
            log.sync()
            break
        failed = False
        while inflight:
            c = h.aio_peek_command_completed()
            if c <= 0:
                break
            what = inflight.pop(c)
            bufs.pop(c, None)
            try:
                h.aio_command_completed(c)
                ok, err = True, 0
            except nbd.Error as e:
                ok, err = False, errno_of(e) or 5
            if what[0] == "w":
                busy.discard(what[2])
                if ok:
                    log.line(f"A {what[1]}")
                    acked += 1
                else:
                    log.line(f"E {what[1]} {err}")
                    errors += 1
                    failed = True
            else:
                log.line(f"F {what[1]}" if ok else f"X {what[1]} {err}")
                if not ok:
                    errors += 1
                    failed = True
        log.sync()
        if failed:
            stop = True
        if not warm_said and acked >= a.warm:
            print("warm", flush=True)
            warm_said = True
        if not stop and plain_since_flush >= a.flush_every and not any(w[0] == "f" for w in inflight.values()):
            submit_flush()
        if stop and not failed and not inflight and plain_since_flush > 0 and not h.aio_is_dead():
            # A clean stop leaves no plain write without its FLUSH.
            submit_flush()
    if errors == 0:
        log.line("Q")
    log.sync()
    print(f"done writes={writes} acked={acked} errors={errors}", flush=True)
    try:
        h.shutdown()
    except nbd.Error:
        pass
    sys.exit(3 if errors else 0)


if __name__ == "__main__":
    main()
