#!/usr/bin/env bash
# Profiles a lab node's FT engine (or, with --guest, the guest it runs)
# with perf, from inside the node: where a checkpoint's CPU goes on the
# node's own (emulated) CPU.
#
#   scripts/lab-perf.sh NODE [SECONDS] [--guest]      NODE: a or b
#
# The lab must be up with an engine running on NODE (`ftctl lab protect`).
# The nodes carry no perf of their own: this host's (Debian's linux-perf,
# installed if missing; 6.1, as the node kernel) is copied in with its
# libraries, once per node boot, over the lab's business network.
# Prints the report by thread and symbol. With --guest: the guest's own
# samples by address (`perf kvm --guest`); resolve them against the guest
# kernel (~/.cache/ftvm/guest-kernel/*/vmlinux, `nm -n`).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
FTCTL="$REPO_DIR/target/release/ftctl"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/ftvm/lab-perf"
PORT=9917

die() { echo "lab-perf: $*" >&2; exit 1; }
log() { echo "[lab-perf] $*" >&2; }

node="${1:-}"
[[ "$node" == a || "$node" == b ]] || die "usage: $0 a|b [SECONDS] [--guest]"
seconds="${2:-6}"
[[ "$seconds" =~ ^[0-9]+$ ]] || die "SECONDS must be a number, not '$seconds'"
guest=false
[[ "${3:-}" == --guest ]] && guest=true
[[ -x "$FTCTL" ]] || die "$FTCTL is missing: cargo build --release -p ftctl"

if ! command -v perf >/dev/null; then
    log "installing linux-perf (apt)"
    apt-get install -y -q linux-perf >/dev/null || die "could not install linux-perf"
fi

# perf and the libraries it loads, packed once.
pack="$CACHE/perf.tgz"
if [[ ! -s "$pack" || "$(command -v perf)" -nt "$pack" ]]; then
    log "packing $(command -v perf) with its libraries"
    rm -rf "$CACHE/tree" && mkdir -p "$CACHE/tree/lib"
    cp "$(command -v perf)" "$CACHE/tree/perf"
    for lib in $(ldd "$(command -v perf)" | grep -o '/[^ ]*'); do
        cp -L "$lib" "$CACHE/tree/lib/"
    done
    tar czf "$pack.tmp" -C "$CACHE/tree" . && mv "$pack.tmp" "$pack"
fi

ip="$("$FTCTL" lab status | sed -n "s/^node $node: running.*business \([0-9.]*\).*/\1/p")"
[[ -n "$ip" ]] || die "node $node is not running (ftctl lab status)"

in_node() { "$FTCTL" lab exec "$node" -- sh -c "$1"; }

if ! in_node 'test -x /tmp/perf/perf' >/dev/null 2>&1; then
    log "copying perf into node $node ($ip)"
    in_node "rm -rf /tmp/perf && mkdir -p /tmp/perf && cd /tmp/perf && \
             timeout 60 nc -l -p $PORT | tar xzf -" &
    receiver=$!
    sent=false
    for _ in $(seq 1 20); do
        sleep 0.5
        if (cat "$pack" > "/dev/tcp/$ip/$PORT") 2>/dev/null; then
            sent=true
            break
        fi
    done
    wait "$receiver" || true
    $sent || die "could not reach node $node's receiver at $ip:$PORT"
    in_node 'test -x /tmp/perf/perf' >/dev/null || die "perf did not arrive in node $node"
fi

PERF='/tmp/perf/lib/ld-linux-x86-64.so.2 --library-path /tmp/perf/lib /tmp/perf/perf'
if $guest; then
    log "sampling node $node's guest for ${seconds}s"
    in_node "$PERF kvm --guest record -e cpu-clock -F 499 -a -o /tmp/perf-guest.data \
             -- sleep $seconds >/dev/null 2>&1; \
             $PERF kvm --guest -i /tmp/perf-guest.data report --stdio --sort sym 2>/dev/null \
             | grep -v '^#' | grep -v '^\$' | sed 's/ *- *- *\$//' | head -40"
else
    log "sampling node $node's engine for ${seconds}s"
    in_node "pid=\$(pidof ftprotect) || { echo 'no ftprotect runs here' >&2; exit 1; }; \
             $PERF record -e cpu-clock -F 999 -p \$pid -o /tmp/perf-engine.data \
             -- sleep $seconds >/dev/null 2>&1; \
             $PERF report -i /tmp/perf-engine.data --stdio --sort comm,dso,symbol 2>/dev/null \
             | grep -v '^#' | grep -v '^\$' | sed 's/ *- *- *\$//' | head -60"
fi
