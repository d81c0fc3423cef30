#!/usr/bin/env bash
# Installs the web console's third-party front-end packages (uPlot, from the
# npm registry, pinned with its integrity hash in ftd/console/package-lock.json)
# with `npm ci`, cached on the lock, and prints the folder that holds what
# ftd serves: vendor/uPlot.iife.min.js, vendor/uPlot.min.css (and the
# licence). ftd reads them from its console_dir (/usr/share/ftvm/console by
# default; the lab node image has them there). Nothing is fetched when the
# console is used.
# Usage: console-vendor.sh [INSTALL_DIR]   (also copies the folder there)
STEP=console-vendor
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SRC="$REPO_DIR/ftd/console"
KEY=$(hash_inputs "$SRC/package.json" "$SRC/package-lock.json" "$IMAGES_DIR/console-vendor.sh")
OUT=$(stage_dir console-vendor "$KEY")
if [ -f "$OUT/.done" ]; then
    log "cached: $OUT"
else
    command -v npm >/dev/null ||
        die "npm is missing: install Node.js with npm (Debian: apt install npm) to fetch the console's charting library"
    log "installing the console's front-end packages from the npm registry (npm ci)"
    rm -rf "$OUT"; mkdir -p "$OUT/work" "$OUT/vendor"
    cp "$SRC/package.json" "$SRC/package-lock.json" "$OUT/work/"
    (cd "$OUT/work" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
    dist="$OUT/work/node_modules/uplot/dist"
    cp "$dist/uPlot.iife.min.js" "$dist/uPlot.min.css" "$OUT/vendor/"
    cp "$OUT/work/node_modules/uplot/LICENSE" "$OUT/vendor/uPlot.LICENSE"
    rm -rf "$OUT/work"
    touch "$OUT/.done"
    log "ready: $OUT"
fi
if [ -n "${1:-}" ]; then
    mkdir -p "$1/vendor"
    cp "$OUT/vendor/"* "$1/vendor/"
    log "installed into $1"
fi
echo "$OUT"
