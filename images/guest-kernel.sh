#!/usr/bin/env bash
# Builds the guest kernel from Debian's linux-source-6.1: `make tinyconfig`
# plus guest-kernel/ftvm.config. Produces vmlinux (PVH ELF) and bzImage.
# Prints the artifact folder on stdout.
STEP=guest-kernel
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_pkgs linux-source-6.1 flex bison libelf-dev libssl-dev bc make gcc xz-utils
SRC_VER=$(dpkg-query -W -f='${Version}' linux-source-6.1)
HASH_EXTRA="linux-source-6.1=$SRC_VER" \
    KEY=$(hash_inputs "$IMAGES_DIR/guest-kernel.sh" "$IMAGES_DIR/guest-kernel/ftvm.config")
OUT=$(stage_dir guest-kernel "$KEY")
if [ -f "$OUT/.done" ]; then
    log "cached: $OUT"
    echo "$OUT"; exit 0
fi

WORK="$FTVM_CACHE/build/guest-kernel-$KEY"
rm -rf "$WORK" "$OUT"; mkdir -p "$WORK" "$OUT"
log "unpacking linux-source-6.1 ($SRC_VER)"
tar -C "$WORK" -xf /usr/src/linux-source-6.1.tar.xz
cd "$WORK"/linux-source-6.1
log "configuring: tinyconfig + ftvm.config"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$IMAGES_DIR/guest-kernel/ftvm.config" >"$WORK/merge.log" 2>&1
make -s olddefconfig >/dev/null
# Every option of the fragment must have survived the merge (a dependency
# that is not met silently drops an option).
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue;; esac
    opt=${line%%=*}; val=${line#*=}
    if [ "$val" = n ]; then
        ! grep -q "^$opt=y" .config || die "$opt is set although the fragment turns it off"
    else
        grep -qx "$line" .config || die "$line did not survive the merge (a dependency is missing)"
    fi
done <"$IMAGES_DIR/guest-kernel/ftvm.config"
JOBS=$(( $(nproc) + 1 ))
log "compiling with -j$JOBS (about 7 minutes on 2 cores)"
run_with_progress "compiling guest kernel" "$WORK/make.log" make -j"$JOBS" vmlinux bzImage
cp vmlinux "$OUT/vmlinux"
cp arch/x86/boot/bzImage "$OUT/bzImage"
cp .config "$OUT/config"
cd /; rm -rf "$WORK"
touch "$OUT/.done"
log "built: $OUT ($(du -h "$OUT/bzImage" | cut -f1) bzImage, $(du -h "$OUT/vmlinux" | cut -f1) vmlinux)"
echo "$OUT"
