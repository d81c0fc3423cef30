#!/usr/bin/env bash
# Builds the guest's initramfs (cpio.gz) and ext4 root disk from
# busybox-static and the static guest-tools binaries.
# Usage: guest-rootfs.sh BIN_DIR   (folder with the static binaries)
# Prints the artifact folder on stdout.
STEP=guest-rootfs
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BIN_DIR=${1:?usage: guest-rootfs.sh BIN_DIR}
TOOLS=(ft-dirtier ft-counter ft-ledger)

need_pkgs busybox-static cpio e2fsprogs gzip
BB_VER=$(dpkg-query -W -f='${Version}' busybox-static)
E2_VER=$(dpkg-query -W -f='${Version}' e2fsprogs)
inputs=("$IMAGES_DIR/guest-rootfs.sh" "$IMAGES_DIR/guest/init")
for t in "${TOOLS[@]}"; do
    [ -x "$BIN_DIR/$t" ] || die "static binary $BIN_DIR/$t is missing"
    inputs+=("$BIN_DIR/$t")
done
KEY=$(HASH_EXTRA="busybox-static=$BB_VER e2fsprogs=$E2_VER" hash_inputs "${inputs[@]}")
OUT=$(stage_dir guest-rootfs "$KEY")
if [ -f "$OUT/.done" ]; then
    stage_keep guest-rootfs "$OUT"
    log "cached: $OUT"; echo "$OUT"; exit 0
fi
rm -rf "$OUT"; mkdir -p "$OUT"
ROOT="$OUT/root"
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,run,data,root}
cp /bin/busybox "$ROOT/bin/busybox"
for t in "${TOOLS[@]}"; do cp "$BIN_DIR/$t" "$ROOT/bin/$t"; done
# e2fsck (Debian's, dynamically linked) with the libraries it loads, for
# ftguest.fsck (the data disk checked after a crash).
cp /sbin/e2fsck "$ROOT/sbin/e2fsck"
for lib in $(ldd /sbin/e2fsck | awk '$2 == "=>" {print $3} $1 ~ /^\// {print $1}'); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
install -m 0755 "$IMAGES_DIR/guest/init" "$ROOT/sbin/init"
ln -s sbin/init "$ROOT/init"
ln -s busybox "$ROOT/bin/sh"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"
ln -s /proc/mounts "$ROOT/etc/mtab"
log "packing initramfs"
(cd "$ROOT" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9) >"$OUT/initramfs.cpio.gz"
log "making ext4 root disk (mke2fs -d)"
mke2fs -q -t ext4 -L ftguest -d "$ROOT" -F "$OUT/rootfs.ext4" 128M >&2
rm -rf "$ROOT"
stage_keep guest-rootfs "$OUT"
log "built: $OUT"
echo "$OUT"
