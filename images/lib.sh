# Shared helpers for the image build scripts. Source it; do not run it.
# Every artifact lives under $FTVM_CACHE in a folder named after a hash of
# its inputs, with a `.done` stamp written last, so an interrupted build is
# never mistaken for a finished one and a second run is a cache hit.
set -euo pipefail

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$IMAGES_DIR/.." && pwd)
FTVM_CACHE=${FTVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ftvm}
mkdir -p "$FTVM_CACHE"

STEP=${STEP:-images}
log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "$STEP" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# hash_inputs FILE... : a short key over the contents of the files and the
# extra strings passed in $HASH_EXTRA.
hash_inputs() {
    { for f in "$@"; do printf '%s\0' "$(basename "$f")"; cat "$f"; done
      printf '%s' "${HASH_EXTRA:-}"; } | sha256sum | cut -c1-16
}

# missing_pkgs PKG... : prints those of the Debian packages PKG that are
# not installed, one a line.
missing_pkgs() {
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

# need_pkgs PKG... : installs the Debian packages that are not installed yet.
need_pkgs() {
    local missing
    mapfile -t missing < <(missing_pkgs "$@")
    [ ${#missing[@]} -eq 0 ] && return 0
    install_pkgs "${missing[@]}"
    # Installing can remove a package asked for here that conflicts with a
    # new one (a backported qemu-utils, with Debian's qemu-system-x86):
    # once more for those, at versions that go together.
    mapfile -t missing < <(missing_pkgs "$@")
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing again what that install removed: ${missing[*]}"
    install_pkgs "${missing[@]}"
}

# install_pkgs PKG... : apt-get install (root only), the lists updated first
# when needed.
install_pkgs() {
    local missing=("$@")
    [ "$(id -u)" -eq 0 ] || die "packages missing (${missing[*]}) and not root: install them or run as root"
    log "installing Debian packages: ${missing[*]}"
    # Lock against parallel builds (apt takes its own lock, but fails instead of waiting).
    (
        flock 9
        if [ ! -f /var/lib/apt/lists/lock ] || [ -z "$(ls /var/lib/apt/lists/*Packages* 2>/dev/null)" ] \
            || ! apt-cache show "${missing[0]}" >/dev/null 2>&1; then
            apt-get update -q >&2
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    ) 9>"$FTVM_CACHE/.apt.lock"
}

# run_with_progress LABEL LOGFILE CMD... : runs CMD with its output in LOGFILE
# and prints a progress line every 15 seconds (lines of output so far).
run_with_progress() {
    local label=$1 logfile=$2; shift 2
    local start=$SECONDS
    "$@" >"$logfile" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if (( (SECONDS - start) % 15 == 0 )); then
            log "$label: $(wc -l <"$logfile") lines of output, $((SECONDS - start))s"
        fi
    done
    if ! wait "$pid"; then
        tail -n 40 "$logfile" >&2
        die "$label failed after $((SECONDS - start))s (full log: $logfile)"
    fi
    log "$label: done in $((SECONDS - start))s"
}

# stage_dir NAME KEY : prints the cache folder for an artifact.
stage_dir() { printf '%s/%s/%s' "$FTVM_CACHE" "$1" "$2"; }

# stage_keep NAME OUT : marks the artifact OUT as just used and removes all
# but the $FTVM_CACHE_KEEP (default 3) most recently used versions of NAME,
# so that a cache that sees every change of the sources stays bounded.
stage_keep() {
    local name=$1 out=$2 keep=${FTVM_CACHE_KEEP:-3} old
    touch "$out/.done"
    ls -1dt "$FTVM_CACHE/$name"/*/ 2>/dev/null | tail -n +"$((keep + 1))" | while read -r old; do
        log "removing an older $name from the cache: $old"
        rm -rf "$old"
    done
}
