#!/usr/bin/env bash
# Builds everything the lab needs, each step cached on its inputs:
#   1. Debian packages (QEMU, busybox, kernel build tools)
#   2. the project's static binaries (cargo, into target/static)
#   3. the guest kernel            (guest-kernel.sh)
#   4. the guest initramfs and disk (guest-rootfs.sh)
#   5. the web console's charting library (console-vendor.sh, npm registry)
#   6. the lab node image          (lab-node.sh)
# Progress goes to stderr; the artifact paths go to stdout as KEY=PATH lines.
STEP=build
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start=$SECONDS

# One build at a time per cache (tests and the CLI may start builds together).
exec 8>"$FTVM_CACHE/.build.lock"
flock 8

need_pkgs qemu-system-x86 qemu-utils ipxe-qemu busybox-static kmod cpio e2fsprogs iproute2 gzip

TARGET=x86_64-unknown-linux-gnu
STATIC_DIR="$REPO_DIR/target/static"
log "building static binaries (lab-agent, ftvmm, ftprotect, ftd, ftwitness, ftrelay, guest tools)"
(
    cd "$REPO_DIR"
    # Run from a test, this script inherits the variables cargo sets for the test
    # process (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...). Build scripts that read
    # them (ring's does) would see them change between a run from the shell and
    # one from a test, and everything above them would be rebuilt each time
    # (about three minutes on two cores). Cargo sets its own for each build script.
    for var in $(compgen -e); do
        case "$var" in
            CARGO_MANIFEST_* | CARGO_PKG_* | CARGO_CRATE_NAME | CARGO_BIN_NAME | CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR | OUT_DIR) unset "$var" ;;
        esac
    done
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$STATIC_DIR" \
        cargo build --release --locked --target "$TARGET" \
        -p lab --bin lab-agent -p vmm --bin ftvmm -p guest-tools --bin ft-dirtier --bin ft-counter --bin ft-ledger -p replicator --bin ftprotect -p ftd --bin ftd -p witness --bin ftwitness -p fault-relay --bin ftrelay >&2
)
BIN_DIR="$STATIC_DIR/$TARGET/release"
for b in lab-agent ftvmm ftprotect ftd ftwitness ftrelay ft-dirtier ft-counter ft-ledger; do
    [ -x "$BIN_DIR/$b" ] || die "$b was not built"
    if readelf -d "$BIN_DIR/$b" | grep -q NEEDED; then die "$b is not statically linked"; fi
done

GK=$("$IMAGES_DIR/guest-kernel.sh")
GR=$("$IMAGES_DIR/guest-rootfs.sh" "$BIN_DIR")
CV=$("$IMAGES_DIR/console-vendor.sh")
LN=$("$IMAGES_DIR/lab-node.sh" "$BIN_DIR" "$GK" "$GR" "$CV")

log "all images ready in $((SECONDS - start))s"
cat <<OUT
GUEST_VMLINUX=$GK/vmlinux
GUEST_BZIMAGE=$GK/bzImage
GUEST_INITRAMFS=$GR/initramfs.cpio.gz
GUEST_ROOTFS=$GR/rootfs.ext4
NODE_KERNEL=$LN/vmlinuz
NODE_INITRAMFS=$LN/initramfs.cpio.gz
NODE_IMAGES_DISK=$LN/images.ext4
STATIC_BIN_DIR=$BIN_DIR
CONSOLE_DIR=$CV
OUT
