#!/usr/bin/env bash
# Where a lab node's CPU goes, thread by thread, while a load runs: what
# the guest keeps and what the FT engine, its heartbeats and the daemons
# take (the CPU-bound ratio of `--bench ft_overhead` is the guest's part).
#
#   scripts/lab-cpu.sh NODE [SECONDS] [LOAD]
#
#   NODE     a or b
#   SECONDS  the window (default 5)
#   LOAD     a ledger workload run meanwhile, e.g. "SPIN 8000" or
#            "DIRTY 8000 32" (default: none); sent to $LEDGER
#            (default 10.77.0.100:7000, the ledger of `ftctl lab protect`)
#
# The lab must be up (`ftctl lab protect`). Reads every thread's
# /proc/<pid>/task/<tid>/stat and the node's /proc/stat in the node at
# the start and the end of the window (one `lab exec`, nothing spawned in
# between), and prints each thread's share of the node's CPU time (time in
# the guest counted once, under its vCPU thread), its minor page faults
# per second, and the FT engine's checkpoints per second (its status,
# read just before and after). Needs python3 on this host.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
FTCTL="$REPO_DIR/target/release/ftctl"
LEDGER="${LEDGER:-10.77.0.100:7000}"

die() { echo "lab-cpu: $*" >&2; exit 1; }

node="${1:-}"
[[ "$node" == a || "$node" == b ]] || die "usage: $0 a|b [SECONDS] [LOAD]"
seconds="${2:-5}"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]] || die "SECONDS must be a positive number, not '$seconds'"
load="${3:-}"
[[ -x "$FTCTL" ]] || die "$FTCTL is missing: cargo build --release -p ftctl"
command -v python3 >/dev/null || die "python3 is missing"
"$FTCTL" lab status | grep -q "^node $node: running" || die "node $node is not running (ftctl lab status)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ -n "$load" ]]; then
    host="${LEDGER%:*}"
    port="${LEDGER##*:}"
    (
        exec 3<>"/dev/tcp/$host/$port" || exit 1
        echo "$load" >&3
        read -r -t 600 answer <&3 && echo "$answer" > "$work/answer"
    ) &
    loader=$!
    sleep 1
fi

"$FTCTL" lab ft-status > "$work/status0" 2>/dev/null || true
date +%s.%N > "$work/t0"
"$FTCTL" lab exec "$node" -- sh -c "
    snap() {
        for p in /proc/[0-9]*; do
            read -r c < \$p/comm 2>/dev/null || continue
            for t in \$p/task/[0-9]*/stat; do
                read -r l < \$t 2>/dev/null && echo \"\$c|\$l\"
            done
        done
        head -1 /proc/stat
    }
    snap; echo ===; sleep $seconds; snap" > "$work/snaps" ||
    die "could not read /proc in node $node"
date +%s.%N > "$work/t1"
"$FTCTL" lab ft-status > "$work/status1" 2>/dev/null || true
if [[ -n "$load" ]]; then
    wait "$loader" || true
    echo "load '$load': $(cat "$work/answer" 2>/dev/null || echo 'no answer')"
fi

python3 - "$work" "$node" "$seconds" <<'PY'
import json, re, sys
work, node, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

def snapshot(text):
    threads, cpu = {}, None
    for line in text.strip().splitlines():
        if line.startswith("cpu "):
            cpu = [int(v) for v in line.split()[1:]]
            continue
        m = re.match(r"(.*?)\|(\d+) \((.*)\) (.*)", line)
        if m:
            f = m.group(4).split()
            # utime, stime and minor faults (stat fields 14, 15 and 10).
            name = m.group(3) if m.group(1) == m.group(3) else f"{m.group(1)}/{m.group(3)}"
            threads[m.group(2)] = (name, int(f[11]), int(f[12]), int(f[7]))
    return threads, cpu

before, after = open(f"{work}/snaps").read().split("===")
(t0, c0), (t1, c1) = snapshot(before), snapshot(after)
d = [b - a for a, b in zip(c0, c1)]
# /proc/stat: user nice system idle iowait irq softirq steal guest guest_nice;
# guest time is inside user already.
total = sum(d[:8])
if total <= 0:
    sys.exit("lab-cpu: the node's CPU time did not move")
print(f"node {node}, {seconds:.0f} s: busy {100 * (total - d[3]) / total:.1f}%, "
      f"in the guest {100 * d[8] / total:.1f}%, system {100 * d[2] / total:.1f}%, "
      f"softirq {100 * d[6] / total:.1f}%")
by_name = {}
for tid, (name, u, s, flt) in t1.items():
    a = t0.get(tid)
    # A thread born in the window counts from its birth. (A kworker's name
    # changes with its work: matched by id.)
    du, ds, dflt = (u - a[1], s - a[2], flt - a[3]) if a else (u, s, flt)
    if name.startswith("kworker/"):
        name = name.split("-")[0]
    n = by_name.setdefault(name, [0, 0, 0, 0])
    n[0] += du; n[1] += ds; n[2] += dflt; n[3] += 1
print(f"{'process/thread':<32} {'CPU %':>6} {'user':>6} {'system':>7} {'minor faults/s':>15} threads")
for name, (u, s, flt, count) in sorted(by_name.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
    if u + s == 0:
        continue
    print(f"{name:<32} {100 * (u + s) / total:6.1f} {u:6d} {s:7d} {flt / seconds:15.0f} {count:>7}")

def checkpoints(path):
    text = open(path).read()
    parts = re.split(r"^node (\w): ", text, flags=re.M)
    for i in range(1, len(parts) - 1, 2):
        if parts[i] == node:
            try:
                status = json.loads(parts[i + 1])
            except ValueError:
                return None
            return status and status.get("counters", {}).get("checkpoints")
    return None

try:
    n0, n1 = checkpoints(f"{work}/status0"), checkpoints(f"{work}/status1")
    wall = float(open(f"{work}/t1").read()) - float(open(f"{work}/t0").read())
    if n0 is not None and n1 is not None and n1 >= n0:
        print(f"FT engine on node {node}: {(n1 - n0) / wall:.1f} checkpoints/s "
              f"({n1 - n0} in {wall:.1f} s, the window with the reads around it)")
except OSError:
    pass
PY
