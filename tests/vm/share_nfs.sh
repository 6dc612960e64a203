#!/bin/bash
# ReadWriteMany in the test VM (chroot into the host's root): share_nfs.sh LONGHORN_BIN
# Three replicas and an engine (--frontend auto: the kernel NBD driver here), then
# `longhorn share vol1`, and two NFSv4 mounts of it by the kernel's NFS client: a writer
# appends a timestamp line to index.html ten times a second on mount A while a reader
# reads it on mount B; meanwhile the NFS server is killed (the share manager restarts
# it) and a replica is killed; then the reader appends its own line, and both mounts
# must read the same bytes. Then: unmount, stop the share, e2fsck, check the content.
# Prints `STEP share.<step> OK|FAIL detail` lines; the host test asserts on them.
BIN=$1
SIZE=256M
export RUST_LOG=info NO_COLOR=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
W=/tmp/share; mkdir -p $W /tmp/nfs-a /tmp/nfs-b; cd /tmp
ok=1
step() { echo "STEP share.$1 $2 t=${SECONDS}s ${*:3}"; [ "$2" = FAIL ] && ok=0; true; }
showlog() { for f in $W/share.log $W/engine.log; do [ -f $f ] && tail -n 8 $f | sed "s|^|LOG $(basename $f): |"; done
            [ -f /run/longhorn/vol1.share/ganesha.log ] && grep -vE "DBUS|krb5|keytab|RADOS|credentials" /run/longhorn/vol1.share/ganesha.log | tail -n 6 | sed 's/^/LOG ganesha: /'
            dmesg | tail -n 8 | sed 's/^/DMESG: /'; }
finish() { [ $ok = 1 ] && step all OK || step all FAIL; exit 0; }

modprobe -d "${LH_MODDIR:-/}" -a ext4 nbd loop nfsv4 dummy 2>$W/modprobe.err \
    && step modules OK "$(grep -wE 'nfsv4|sunrpc|nbd' /proc/modules | awk '{print $1}' | tr '\n' ' ')" \
    || { step modules FAIL "$(tr '\n' ' ' < $W/modprobe.err)"; finish; }

# The VM has only a loopback interface, and glibc's getaddrinfo with AI_ADDRCONFIG (as
# ganesha resolves Bind_addr) finds no IPv4 address then. A dummy interface with a
# documentation address (TEST-NET-1, never routed, nothing is sent to it) gives the
# VM what any real host has. Every NFS byte still goes over 127.0.0.1.
ip link add lhdummy type dummy && ip addr add 192.0.2.1/32 dev lhdummy && ip link set lhdummy up \
    || step modules FAIL "cannot add the dummy interface"

pids=(); addrs=()
for i in 0 1 2; do
    $BIN replica serve --dir $W/r$i --volume vol1 --size $SIZE --listen 127.0.0.1:0 > $W/r$i.out 2> $W/r$i.log &
    pids+=($!)
done
for i in 0 1 2; do
    for _ in $(seq 100); do grep -q listening $W/r$i.out && break; sleep 0.2; done
    addrs+=(--replica "$(awk '/listening/ {print $2}' $W/r$i.out)")
done
$BIN engine serve --volume vol1 --size $SIZE "${addrs[@]}" --frontend auto --io-timeout 8 > $W/engine.out 2> $W/engine.log &
epid=$!
for _ in $(seq 300); do grep -q '^ready' $W/engine.out && break; kill -0 $epid 2>/dev/null || break; sleep 0.2; done
grep -q '^device' $W/engine.out && step engine OK "$(grep '^device' $W/engine.out)" || { step engine FAIL; showlog; finish; }

$BIN share vol1 --port 2049 > $W/share.out 2> $W/share.log &
spid=$!
for _ in $(seq 300); do grep -q '^ready' $W/share.out && break; kill -0 $spid 2>/dev/null || break; sleep 0.2; done
grep -q '^ready 127.0.0.1:/vol1' $W/share.out && step start OK "$(grep -o 'mkfs.ext4\|not formatting' $W/share.log | head -1)" \
    || { step start FAIL; showlog; finish; }

# Two mounts, each its own superblock and page cache (nosharecache); hard mounts, so
# a restarting server makes I/O wait, not fail.
nfsmount() {  # DIR VERS
    mount -t nfs4 -o vers=$2,port=2049,hard,timeo=30,nosharecache 127.0.0.1:/vol1 $1 2>$W/mount.err \
        || mount -i -t nfs4 -o vers=$2,port=2049,hard,timeo=30,nosharecache,addr=127.0.0.1,clientaddr=127.0.0.1 127.0.0.1:/vol1 $1 2>>$W/mount.err
}
nfsmount /tmp/nfs-a 4.1 && step mount_a OK "$(grep /tmp/nfs-a /proc/mounts | awk '{print $3, $4}' | cut -c1-80)" || { step mount_a FAIL "$(tr '\n' ' ' < $W/mount.err)"; showlog; finish; }
nfsmount /tmp/nfs-b 4.0 && step mount_b OK "$(grep /tmp/nfs-b /proc/mounts | awk '{print $3, $4}' | cut -c1-80)" || { step mount_b FAIL "$(tr '\n' ' ' < $W/mount.err)"; showlog; finish; }

# One reader's view: whole lines, the writer's numbered from 0 in order, then at most
# the final line. Prints the line count, or fails.
check_view() {
    [ ! -s "$1" ] || [ "$(tail -c1 "$1" | od -An -c | tr -d ' ')" = '\n' ] || { echo "torn last line"; return 1; }
    awk 'BEGIN { n = 0; fin = 0 }
         { if (fin) { print "line after the final line: " $0; exit 1 }
           if ($0 == "longhorn rwx access mode") { fin = 1; next }
           want = sprintf("seq=%05d ", n); if (index($0, want) != 1) { print "line " NR " is \"" $0 "\", expected " want; exit 1 }
           n++ }
         END { print n }' "$1"
}

: > /tmp/nfs-a/index.html; : > $W/expected
# The writer (mount A), about 4 s of appends.
(
    for n in $(seq 0 39); do
        line="seq=$(printf %05d $n) ts=$(date +%s.%N)"
        echo "$line" >> /tmp/nfs-a/index.html || echo "write $n failed" >> $W/writer.err
        echo "$line" >> $W/expected
        sleep 0.1
    done
) &
wpid=$!
# The reader (mount B).
(
    last=0; reads=0
    while kill -0 $wpid 2>/dev/null; do
        cat /tmp/nfs-b/index.html > $W/view 2>>$W/reader.err || { echo "read failed" >> $W/reader.err; continue; }
        n=$(check_view $W/view) || { echo "bad view: $n" >> $W/reader.err; cp $W/view $W/bad-view; }
        [ "${n:-0}" -ge "$last" ] 2>/dev/null || echo "went back from $last to $n lines" >> $W/reader.err
        last=${n:-$last}; reads=$((reads + 1)); sleep 0.05
    done
    echo $reads > $W/reads
) &
rpid=$!

# About 1 s in: kill the NFS server; the share manager must bring it back.
sleep 1
gpid=$(sed -n 's/.*"server_pid": *\([0-9]*\).*/\1/p' /run/longhorn/vol1.share/state.json)
kill -9 "$gpid" 2>/dev/null
t0=$SECONDS
for _ in $(seq 150); do
    npid=$(sed -n 's/.*"server_pid": *\([0-9]*\).*/\1/p' /run/longhorn/vol1.share/state.json)
    grep -q '"state": "serving"' /run/longhorn/vol1.share/state.json && [ -n "$npid" ] && [ "$npid" != "$gpid" ] && break
    sleep 0.2
done
[ -n "$npid" ] && [ "$npid" != "$gpid" ] && kill -0 "$npid" 2>/dev/null \
    && step server_restart OK "pid $gpid killed, $npid serving after $((SECONDS - t0))s" \
    || { step server_restart FAIL "server pid still $npid"; showlog; }
# About 2 s in: kill a replica.
sleep 1
kill -9 ${pids[1]} && step kill_replica OK "replica 1 killed during the appends"

wait $wpid; wait $rpid
[ ! -s $W/writer.err ] && step writer OK "$(wc -l < $W/expected) lines appended on mount A" || { step writer FAIL "$(head -3 $W/writer.err | tr '\n' ' ')"; showlog; }
[ ! -s $W/reader.err ] && step reader OK "$(cat $W/reads) reads on mount B, every one whole and in order" || { step reader FAIL "$(head -3 $W/reader.err | tr '\n' ' ') $(head -c 300 $W/bad-view 2>/dev/null | tr '\n' '|')"; showlog; }

# Then the reader appends; both mounts must hold the same bytes.
echo "longhorn rwx access mode" >> /tmp/nfs-b/index.html && echo "longhorn rwx access mode" >> $W/expected \
    && step append OK || step append FAIL
sleep 1   # attribute caches (close-to-open makes a fresh open revalidate anyway)
if cmp -s /tmp/nfs-a/index.html $W/expected && cmp -s /tmp/nfs-b/index.html $W/expected && check_view /tmp/nfs-a/index.html >/dev/null; then
    step same_bytes OK "$(wc -l < $W/expected) lines, $(md5sum < $W/expected | cut -c1-12) on both mounts"
else
    step same_bytes FAIL "a=$(wc -c < /tmp/nfs-a/index.html) b=$(wc -c < /tmp/nfs-b/index.html) want=$(wc -c < $W/expected)"; showlog
fi
$BIN replica ls -v vol1 > $W/rls.txt 2>&1; rc=$?
grep -q ERR $W/rls.txt && step replica_err OK || step replica_err FAIL "rc=$rc $(tr '\n' ' ' < $W/rls.txt)"
$BIN volume info -v vol1 > $W/vi.txt 2>&1; rc=$?
tail -1 $W/vi.txt | grep -q "ReadWriteMany *serving *127.0.0.1:/vol1" \
    && step volume_info OK "$(tail -1 $W/vi.txt | tr -s ' ')" || step volume_info FAIL "rc=$rc $(tr '\n' '|' < $W/vi.txt)"

umount /tmp/nfs-a && umount /tmp/nfs-b && step umount OK || step umount FAIL "$(grep nfs /proc/mounts | tr '\n' ' ')"
kill -TERM $spid
rc=timeout; for _ in $(seq 150); do kill -0 $spid 2>/dev/null || break; sleep 0.2; done
kill -0 $spid 2>/dev/null || { wait $spid; rc=$?; }
a=$(grep -n -m1 "NFS server stopped" $W/share.log | cut -d: -f1); b=$(grep -n -m1 "filesystem unmounted" $W/share.log | cut -d: -f1)
[ "$rc" = 0 ] && [ -n "$a" ] && [ -n "$b" ] && [ "$a" -lt "$b" ] && ! grep -q vol1.share /proc/mounts \
    && step stop OK "server stopped, then unmounted" || { step stop FAIL "rc=$rc"; showlog; }
e2fsck -fn /dev/longhorn/vol1 > $W/fsck.txt 2>&1 && step e2fsck OK || step e2fsck FAIL "$(tail -n 4 $W/fsck.txt | tr '\n' ' ')"
mkdir -p /tmp/direct && mount /dev/longhorn/vol1 /tmp/direct && cmp -s /tmp/direct/index.html $W/expected \
    && step content OK "every line written through NFS is on the volume" || step content FAIL "$(wc -c < /tmp/direct/index.html 2>&1)"
umount /tmp/direct 2>/dev/null
kill -TERM $epid; for _ in $(seq 150); do kill -0 $epid 2>/dev/null || break; sleep 0.2; done
kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null
finish
