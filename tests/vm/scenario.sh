#!/bin/bash
# The block device scenario, run inside the test VM (chroot into the host's root) for
# each frontend given: scenario.sh LONGHORN_BIN FRONTEND...
# Prints one machine-readable line per step: `STEP <frontend>.<step> OK|FAIL|SKIP detail`
# (and `FIO <frontend> <job> <iops>`); the host test asserts on them.
BIN=$1; shift
SIZE=256M
export RUST_LOG=info NO_COLOR=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /tmp

modprobe -d "${LH_MODDIR:-/}" -a ext4 nbd ublk_drv loop 2>/tmp/modprobe.err \
    && echo "STEP vm.modules OK $(ls /dev/nbd0 /dev/ublk-control 2>&1 | tr '\n' ' ')" \
    || echo "STEP vm.modules FAIL $(tr '\n' ' ' < /tmp/modprobe.err)"

# fio's write (or read) IOPS from terse v3 output.
fio_iops() { awk -F';' -v f="$2" '$1=="3" { print int($f) }' "$1" | head -1; }

# nbd and ublk (called from run, uses its $F $W $D and step): the queue limits the
# device declares, then FUA writes, WRITE_ZEROES and DISCARD through the device, checked
# by reading back and by the block layer's counters. ublk declares a write-back cache,
# FUA, discard and write-zeroes up to 1 GiB a request, one hardware queue per CPU and
# depth >= 64; the NBD driver gets discards capped at 1 GiB and WRITE_ZEROES offered.
device_checks() {
    local K=/sys/dev/block/$((0x$(stat -c %t $D))):$((0x$(stat -c %T $D)))
    local q=$K/queue G=1073741824
    local wc fua dmax zmax nq nr lbs
    wc=$(cat $q/write_cache) fua=$(cat $q/fua) dmax=$(cat $q/discard_max_bytes) zmax=$(cat $q/write_zeroes_max_bytes)
    nq=$(ls $K/mq | wc -l) nr=$(cat $q/nr_requests) lbs=$(cat $q/logical_block_size)
    local lim="write_cache='$wc' fua=$fua discard_max=$dmax write_zeroes_max=$zmax hw_queues=$nq/$(nproc)cpus nr_requests=$nr lbs=$lbs max_kb=$(cat $q/max_sectors_kb)"
    if [ "$wc" = "write back" ] && [ "$fua" = 1 ] && [ "$dmax" = $G ] && [ "$zmax" -ge $G ] \
        && { [ $F = nbd ] || { [ "$zmax" = $G ] && [ "$nq" = "$(nproc)" ] && [ "$nr" -ge 64 ]; }; }; then
        step limits OK "$lim"
    else
        step limits FAIL "$lim"
    fi
    # 8 MiB of random data at 200 MiB written with FUA (O_DIRECT|O_DSYNC), zeroed in its
    # middle (BLKZEROOUT: WRITE_ZEROES), 40 MiB after it discarded (two requests), and the
    # device fsync'ed (FLUSH).
    local M=1048576 s0 s1
    s0=$(awk '{print $12, $16}' $K/stat)
    head -c $((8 * M)) /dev/urandom > $W/rand8m
    dd if=$W/rand8m of=$D bs=1M seek=200 oflag=direct,dsync status=none \
        && blkdiscard -z -o $((202 * M)) -l $((2 * M)) $D \
        && blkdiscard -o $((208 * M)) -l $((40 * M)) $D \
        && sync $D \
        && dd if=/dev/zero of=$W/rand8m bs=1M seek=2 count=2 conv=notrunc status=none \
        && dd if=$D bs=1M skip=200 count=8 iflag=direct status=none | cmp - $W/rand8m > $W/zero.txt 2>&1
    local rc=$?
    s1=$(awk '{print $12, $16}' $K/stat)
    # /sys/block/X/stat: field 12 = discards completed, 16 = flushes completed.
    if [ $rc = 0 ] && [ "${s1% *}" -gt "${s0% *}" ] && [ "${s1#* }" -gt "${s0#* }" ]; then
        step discard_zeroes OK "fua write + write-zeroes + discard read back right; discards/flushes ${s0// //} -> ${s1// //}"
    else
        step discard_zeroes FAIL "rc=$rc $(tr '\n' ' ' < $W/zero.txt) discards/flushes ${s0// //} -> ${s1// //}"; showlog
    fi
    # Long ranges, past the engine's old 32 MiB limit: 64 MiB of random data at 32 MiB
    # discarded by one blkdiscard (one DISCARD request), and 64 MiB at 96 MiB zeroed by
    # `blkdiscard -z` (40 MiB) and `fallocate -z` (24 MiB); all 128 MiB read back zero.
    head -c $((64 * M)) /dev/urandom > $W/rand64m
    dd if=$W/rand64m of=$D bs=1M seek=32 oflag=direct status=none \
        && dd if=$W/rand64m of=$D bs=1M seek=96 oflag=direct status=none && sync $D
    s0=$(awk '{print $12}' $K/stat)
    blkdiscard -o $((32 * M)) -l $((64 * M)) $D > $W/long.txt 2>&1 \
        && blkdiscard -z -o $((96 * M)) -l $((40 * M)) $D >> $W/long.txt 2>&1 \
        && fallocate -z -o $((136 * M)) -l $((24 * M)) $D >> $W/long.txt 2>&1 \
        && sync $D \
        && dd if=$D bs=1M skip=32 count=128 iflag=direct status=none | cmp -n $((128 * M)) - /dev/zero >> $W/long.txt 2>&1
    rc=$?
    s1=$(awk '{print $12}' $K/stat)
    if [ $rc = 0 ] && [ $((s1 - s0)) = 1 ]; then
        step long_ranges OK "64 MiB discard in one request, 40 MiB blkdiscard -z and 24 MiB fallocate -z read back zero"
    else
        step long_ranges FAIL "rc=$rc discards ${s0} -> ${s1} $(tr '\n' ' ' < $W/long.txt)"; showlog
    fi
}

run() {
    local F=$1 W=/tmp/$1 ok=1
    local step
    step() { echo "STEP $F.$1 $2 t=${SECONDS}s ${*:3}"; [ "$2" = FAIL ] && ok=0; true; }
    showlog() { [ -f $W/engine.log ] && tail -n 15 $W/engine.log | sed "s/^/LOG $F: /"; dmesg | tail -n 10 | sed "s/^/DMESG $F: /"; }
    mkdir -p $W /tmp/mnt-$F
    local addrs=() pids=()
    for i in 0 1 2; do
        $BIN replica serve --dir $W/r$i --volume vol1 --size $SIZE --listen 127.0.0.1:0 > $W/r$i.out 2> $W/r$i.log &
        pids+=($!)
    done
    for i in 0 1 2; do
        for _ in $(seq 100); do grep -q listening $W/r$i.out && break; sleep 0.2; done
        addrs+=(--replica "$(awk '/listening/ {print $2}' $W/r$i.out)")
    done
    $BIN engine serve --volume vol1 --size $SIZE "${addrs[@]}" --frontend $F --io-timeout 8 > $W/engine.out 2> $W/engine.log &
    local epid=$!
    for _ in $(seq 300); do grep -q '^ready' $W/engine.out && break; kill -0 $epid 2>/dev/null || break; sleep 0.2; done
    if ! grep -q '^ready' $W/engine.out; then
        step engine FAIL "engine did not start: $(grep -v '^\s*$' $W/engine.log | tail -n 3 | tr '\n' ' ')"; showlog
        kill -9 "${pids[@]}" $epid 2>/dev/null; wait 2>/dev/null; return
    fi
    step engine OK "$(grep '^device' $W/engine.out)"
    local D=/dev/longhorn/vol1
    [ -b $D ] && step device OK "$(ls -l $D | awk '{print $5,$6}') $(grep -o 'kernel=[^ ]*' $W/engine.log | head -1)" || step device FAIL "$D is not a block device"

    fio --name=raw --filename=$D --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=16M \
        --verify=crc32c --verify_fatal=1 --verify_state_save=0 --output-format=terse --terse-version=3 > $W/fio-raw.txt 2>&1 \
        && step fio_raw OK "write_iops=$(fio_iops $W/fio-raw.txt 49)" || { step fio_raw FAIL "$(tail -n 3 $W/fio-raw.txt | tr '\n' ' ')"; showlog; }
    echo "FIO $F raw-randwrite-4k-qd16-verify $(fio_iops $W/fio-raw.txt 49)"
    { [ $F = ublk ] || [ $F = nbd ]; } && device_checks


    mkfs.ext4 -q -F $D > $W/mkfs.txt 2>&1 && step mkfs OK || { step mkfs FAIL "$(tail -n 3 $W/mkfs.txt | tr '\n' ' ')"; showlog; }
    mount $D /tmp/mnt-$F 2>$W/mount.txt && step mount OK || step mount FAIL "$(cat $W/mount.txt)"
    for i in 1 2 3; do head -c $((i * 3 * 1048576 + 4321)) /dev/urandom > /tmp/mnt-$F/file$i; done
    sync
    (cd /tmp/mnt-$F && sha256sum file1 file2 file3 > $W/sums) && step files OK || step files FAIL
    # A snapshot of the live, mounted volume: every replica gets the layer.
    if $BIN snapshot create snap1 -v vol1 > $W/snap.txt 2>&1 && $BIN snapshot ls -v vol1 --json 2>&1 | grep -q '"snap1"' \
        && [ -f $W/r0/volume-snap-snap1.img ] && [ -f $W/r1/volume-snap-snap1.img ] && [ -f $W/r2/volume-snap-snap1.img ]; then
        step snapshot OK "$(cat $W/snap.txt)"
    else
        step snapshot FAIL "$(tail -n 2 $W/snap.txt | tr '\n' ' ')"
    fi

    fio --name=fs --filename=/tmp/mnt-$F/fio.dat --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=48M \
        --fsync=64 --verify=crc32c --verify_fatal=1 --verify_state_save=0 --output-format=terse --terse-version=3 > $W/fio-fs.txt 2>&1 &
    local fpid=$!
    for _ in $(seq 600); do [ "$(stat -c %s /tmp/mnt-$F/fio.dat 2>/dev/null || echo 0)" -ge $((48 * 1048576)) ] && break; sleep 0.1; done
    sleep 2
    if kill -0 $fpid 2>/dev/null; then
        kill -9 ${pids[1]}; step kill_replica OK "replica 1 killed during fio"
    else
        step kill_replica FAIL "fio ended before the replica could be killed"
    fi
    wait $fpid && step fio_fs OK "write_iops=$(fio_iops $W/fio-fs.txt 49) errors=0" || { step fio_fs FAIL "$(tail -n 3 $W/fio-fs.txt | tr '\n' ' ')"; showlog; }
    echo "FIO $F fs-randwrite-4k-qd16-verify-kill $(fio_iops $W/fio-fs.txt 49)"
    $BIN replica ls -v vol1 2>&1 | grep -q ERR && step replica_err OK || step replica_err FAIL "$($BIN replica ls -v vol1 2>&1 | tr '\n' ' ')"

    umount /tmp/mnt-$F && step umount OK || step umount FAIL
    e2fsck -fn $D > $W/fsck.txt 2>&1 && step e2fsck OK || step e2fsck FAIL "$(tail -n 5 $W/fsck.txt | tr '\n' ' ')"
    mount $D /tmp/mnt-$F && (cd /tmp/mnt-$F && sha256sum -c --quiet $W/sums) > $W/sumcheck.txt 2>&1 \
        && step checksums OK || step checksums FAIL "$(cat $W/sumcheck.txt | tr '\n' ' ')"

    kill -TERM $epid; sleep 2
    if kill -0 $epid 2>/dev/null && grep -q "is mounted on" $W/engine.log; then step refuse_mounted OK; else step refuse_mounted FAIL "engine stopped while mounted"; fi
    umount /tmp/mnt-$F
    kill -TERM $epid
    local rc=timeout
    for _ in $(seq 300); do kill -0 $epid 2>/dev/null || break; sleep 0.2; done
    kill -0 $epid 2>/dev/null || { wait $epid; rc=$?; }
    if [ "$rc" = 0 ] && [ ! -e $D ] && ! ls /sys/block/*/pid 2>/dev/null | grep -q . && ! ls /dev/ublkb* >/dev/null 2>&1; then
        step stop OK "device node removed, device detached"
    else
        step stop FAIL "rc=$rc node=$(ls $D 2>&1) $(ls /sys/block/*/pid /dev/ublkb* 2>/dev/null | tr '\n' ' ')"; showlog
    fi
    kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null
    [ $ok = 1 ] && step all OK || step all FAIL
}

for F in "$@"; do run $F; done
