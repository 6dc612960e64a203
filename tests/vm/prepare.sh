#!/usr/bin/env bash
# Prepares the test VM: Debian's bookworm-backports 6.12 kernel (fetched once, cached
# under /var/cache/longhorn-vm) and an initramfs with busybox and the 9p modules.
# Prints `KERNEL path`, `INITRD path` and `MODDIR dir` on success; exits non-zero with a
# reason otherwise. See shared docs TESTING.md for the recipe this follows.
set -euo pipefail
CACHE=${LONGHORN_VM_CACHE:-/var/cache/longhorn-vm}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # two tests may prepare at once

die() { echo "vm/prepare: $*" >&2; exit 1; }

for t in qemu-system-x86_64 busybox cpio xz depmod dpkg-deb apt-get; do
    command -v "$t" >/dev/null || [ -x "/bin/$t" ] || die "$t is missing (tests/run installs qemu-system-x86, busybox-static, cpio, xz-utils, kmod)"
done

K="$CACHE/k"
if [ ! -f "$CACHE/kernel.ok" ]; then
    src=/etc/apt/sources.list.d/longhorn-bookworm-backports.list
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" > "$src"
    fi
    apt-get update -q >/dev/null 2>"$CACHE/apt-update.err" || die "apt-get update failed: $(tail -3 "$CACHE/apt-update.err")"
    # The newest generic 6.12 kernel image (not -rt, -cloud or -dbg); the -unsigned
    # package is the same kernel without the Secure Boot signature.
    pkg=$(apt-cache search --names-only '^linux-image-6\.12' | awk '{print $1}' \
          | grep -E '^linux-image-6\.12\.[0-9]+\+(deb12|bpo)-amd64-unsigned$' | sort -V | tail -1)
    [ -n "$pkg" ] || pkg=$(apt-cache search --names-only '^linux-image-6\.12' | awk '{print $1}' \
          | grep -E '^linux-image-6\.12\.[0-9]+\+(deb12|bpo)-amd64$' | sort -V | tail -1)
    [ -n "$pkg" ] || die "no generic linux-image-6.12*-amd64 package in bookworm-backports (is the Debian mirror reachable?)"
    rm -rf "$CACHE/dl" "$K"; mkdir -p "$CACHE/dl" "$K"
    (cd "$CACHE/dl" && apt-get download -q "$pkg" >/dev/null 2>"$CACHE/download.err") || die "apt-get download $pkg failed: $(tail -3 "$CACHE/download.err")"
    dpkg-deb -x "$CACHE"/dl/*.deb "$K" || die "unpacking $pkg failed"
    rm -rf "$CACHE/dl"
    echo "$pkg" > "$CACHE/kernel.ok"
fi
V=$(ls "$K/lib/modules" | head -1)
[ -n "$V" ] || die "no modules in $K"
[ -f "$K/lib/modules/$V/modules.dep" ] || depmod -b "$K" "$V" || die "depmod failed"
KERNEL="$K/boot/vmlinuz-$V"
[ -f "$KERNEL" ] || die "no $KERNEL"
M="$K/lib/modules/$V/kernel"
for m in drivers/block/nbd.ko.xz drivers/block/ublk_drv.ko.xz; do
    [ -f "$M/$m" ] || die "$m missing from kernel $V"
done

# The initramfs: rebuilt when init changes (cheap: a few hundred KiB).
INITRD="$CACHE/initrd-$V.cpio.gz"
if [ ! -f "$INITRD" ] || [ "$HERE/init" -nt "$INITRD" ]; then
    R=$(mktemp -d "$CACHE/initrd.XXXX")
    mkdir -p "$R"/{bin,dev,proc,sys,host,lib/modules}
    cp "$(command -v busybox || echo /bin/busybox)" "$R/bin/busybox"
    for m in fs/netfs/netfs.ko.xz net/9p/9pnet.ko.xz net/9p/9pnet_virtio.ko.xz fs/9p/9p.ko.xz; do
        [ -f "$M/$m" ] || die "$m missing from kernel $V"
        xz -dc "$M/$m" > "$R/lib/modules/$(basename "$m" .xz)"
    done
    cp "$HERE/init" "$R/init"; chmod +x "$R/init"
    (cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$R"
fi
echo "KERNEL $KERNEL"
echo "INITRD $INITRD"
echo "MODDIR $K"
