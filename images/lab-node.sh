#!/usr/bin/env bash
# Builds the lab node image: Debian's cloud kernel, its kvm/kvm-amd, virtio,
# tun and bridge modules, and an initramfs with busybox and the project's
# static binaries (lab-agent, ftvmm, ftprotect, ftd, ftrelay); plus the read-only "images" disk that
# every node mounts on /images (guest kernel, guest initramfs and root disk,
# an empty guest data disk, static guest binaries).
# Usage: lab-node.sh BIN_DIR GUEST_KERNEL_DIR GUEST_ROOTFS_DIR CONSOLE_DIR
#   (CONSOLE_DIR: console-vendor.sh's output, installed as ftd's console_dir)
# Prints the artifact folder on stdout.
STEP=lab-node
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BIN_DIR=${1:?usage}; GK=${2:?usage}; GR=${3:?usage}; CV=${4:?usage}
NODE_BINS=(lab-agent ftvmm ftprotect ftd ftrelay)
IMAGE_BINS=(ftvmm ft-dirtier)
MODULES=(kvm_amd kvm_intel virtio_pci virtio_net virtio_blk tun bridge)

need_pkgs busybox-static cpio e2fsprogs kmod gzip binutils

# The cloud kernel package is named by linux-image-cloud-amd64's dependency.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$pkg" ]; then
    log "refreshing apt lists to find linux-image-cloud-amd64"
    apt-get update -q >&2
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$pkg" ] || die "cannot find the package that linux-image-cloud-amd64 depends on"
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
KDIR="$FTVM_CACHE/cloud-kernel/$pkg-$ver"
if [ ! -f "$KDIR/.done" ]; then
    rm -rf "$KDIR"; mkdir -p "$KDIR"
    log "downloading $pkg ($ver)"
    (cd "$KDIR" && apt-get download -q "$pkg" >&2 2>/dev/null) || (cd "$KDIR" && apt-get download "$pkg" >&2)
    dpkg -x "$KDIR"/*.deb "$KDIR/root"
    rm -f "$KDIR"/*.deb
    touch "$KDIR/.done"
else
    log "cached cloud kernel: $KDIR"
fi
KVER=$(ls "$KDIR/root/lib/modules")

inputs=("$IMAGES_DIR/lab-node.sh" "$IMAGES_DIR/node/rcS" "$IMAGES_DIR/node/inittab"
        "$GK/vmlinux" "$GK/bzImage" "$GR/initramfs.cpio.gz" "$GR/rootfs.ext4"
        "$CV"/vendor/*)
for b in "${NODE_BINS[@]}" "${IMAGE_BINS[@]}"; do
    [ -x "$BIN_DIR/$b" ] || die "static binary $BIN_DIR/$b is missing"
    inputs+=("$BIN_DIR/$b")
done
KEY=$(HASH_EXTRA="$pkg=$ver busybox=$(dpkg-query -W -f='${Version}' busybox-static)" hash_inputs "${inputs[@]}")
OUT=$(stage_dir lab-node "$KEY")
if [ -f "$OUT/.done" ]; then
    stage_keep lab-node "$OUT"
    log "cached: $OUT"; echo "$OUT"; exit 0
fi
rm -rf "$OUT"; mkdir -p "$OUT"
cp "$KDIR/root/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

ROOT="$OUT/initramfs-root"
mkdir -p "$ROOT"/{bin,sbin,etc/init.d,etc/ftlab,proc,sys,dev,tmp,run,data,images,root,lib/modules}
cp /bin/busybox "$ROOT/bin/busybox"
# busybox init runs as PID 1; applet links are made at build time so rcS
# can use them at once.
for a in $(/bin/busybox --list); do
    [ -e "$ROOT/bin/$a" ] || ln -s busybox "$ROOT/bin/$a"
done
ln -s ../bin/busybox "$ROOT/sbin/init"
ln -s bin/busybox "$ROOT/init"
# Debug sections off: the initramfs is unpacked into the node's memory.
for b in "${NODE_BINS[@]}"; do strip --strip-debug -o "$ROOT/bin/$b" "$BIN_DIR/$b"; done
install -m 0755 "$IMAGES_DIR/node/rcS" "$ROOT/etc/init.d/rcS"
# The web console's charting library, where ftd looks for it by default.
mkdir -p "$ROOT/usr/share/ftvm/console/vendor"
cp "$CV"/vendor/* "$ROOT/usr/share/ftvm/console/vendor/"
cp "$IMAGES_DIR/node/inittab" "$ROOT/etc/inittab"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"

# Modules in load order, from depmod's dependency list.
log "resolving module order for ${MODULES[*]}"
depmod -b "$KDIR/root" "$KVER"
: >"$ROOT/etc/ftlab/modules"
for m in "${MODULES[@]}"; do
    modprobe -d "$KDIR/root" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r path; do
    rel=${path#"$KDIR/root/lib/modules/$KVER/"}
    mkdir -p "$ROOT/lib/modules/$(dirname "$rel")"
    cp "$path" "$ROOT/lib/modules/$rel"
    echo "$rel" >>"$ROOT/etc/ftlab/modules"
done
# kvm_intel fails to load on AMD (and the reverse): harmless, rcS says so.
log "packing node initramfs ($(wc -l <"$ROOT/etc/ftlab/modules") modules)"
(cd "$ROOT" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$OUT/initramfs.cpio.gz"
rm -rf "$ROOT"

# The read-only images disk.
IMG="$OUT/images-root"
mkdir -p "$IMG/bin"
cp "$GK/vmlinux" "$GK/bzImage" "$IMG/"
cp "$GR/initramfs.cpio.gz" "$IMG/guest-initramfs.cpio.gz"
cp "$GR/rootfs.ext4" "$IMG/guest-rootfs.ext4"
for b in "${IMAGE_BINS[@]}"; do cp "$BIN_DIR/$b" "$IMG/bin/$b"; done
# An empty 16 MiB ext4 data disk for protected guests (the ledger's file).
mke2fs -q -t ext4 -L ftdata -F "$IMG/guest-data.ext4" 16M >&2
size_mb=$(( $(du -sm "$IMG" | cut -f1) + 64 ))
log "making images disk (${size_mb} MiB)"
mke2fs -q -t ext4 -L ftimages -d "$IMG" -F "$OUT/images.ext4" "${size_mb}M" >&2
rm -rf "$IMG"
stage_keep lab-node "$OUT"
log "built: $OUT"
echo "$OUT"
