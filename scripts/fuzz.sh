#!/usr/bin/env bash
# Fuzzes the decoders of what a peer sends (the targets in fuzz/fuzz_targets/)
# with cargo fuzz (libFuzzer, AddressSanitizer), each for a while, and fails
# on any crash, hang (a run over 5 s) or allocation over the limit.
#
#   ./scripts/fuzz.sh [SECONDS] [TARGET...]   # default: 20 s each, every target
#   FUZZ_SECS=600 ./scripts/fuzz.sh           # the long run (about 75 minutes)
#
# Environment: FUZZ_SECS (seconds per target, if not given as the first
# argument), FUZZ_SANITIZER (address, or none where ASan cannot run),
# FUZZ_MERGE=1 (replace fuzz/corpus/<target> with the fewest inputs that
# reach every edge it and the run's corpus reach: the committed corpus),
# FUZZ_TARGET_DIR (the build, the logs and the runs' own corpus, kept
# minimised; default in the project's cache, $FTVM_CACHE, so that a later
# run starts warm: a fresh clone shares it).
# The seeds in fuzz/corpus/ come from `cargo run --example seeds` in fuzz/.
# cargo-fuzz is installed into ~/.cargo/bin if missing; it needs nightly
# flags, which the stable toolchain accepts with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

secs=${FUZZ_SECS:-20}
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    secs=$1
    shift
fi
sanitizer=${FUZZ_SANITIZER:-address}
cache=${FTVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ftvm}
target_dir=${FUZZ_TARGET_DIR:-$cache/fuzz-target}
CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1
# A smaller quarantine than ASan's 256 MB: what stays resident is then the
# targets' own memory, which the RSS limit is for.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=64}
start=$SECONDS

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION (once: it stays in ~/.cargo/bin)"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# The largest input each target is given, in bytes.
max_len() {
    case $1 in
    sync_plan) echo 1024 ;;
    disk_records | checkpoint_state) echo 8192 ;;
    page_records) echo 16448 ;; # four page records
    page_delta) echo 8200 ;;    # a seed and a delta of a page, twice over
    *) echo 65536 ;;
    esac
}

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
# One run at a time per target folder: runs share its binaries, corpus and
# logs (a second run's build would replace the binaries the first runs).
mkdir -p "$target_dir/logs"
exec 9>"$target_dir/.lock"
if ! flock -n 9; then
    echo "another fuzz run uses $target_dir; waiting for it"
    flock 9
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
build=(--sanitizer "$sanitizer" --target-dir "$target_dir" --target "$triple")
echo "building ${#targets[@]} fuzz targets (sanitizer: $sanitizer, into $target_dir)"
cargo fuzz build "${build[@]}"
echo "built in $((SECONDS - start))s"
# The runs below use these binaries as built now: a source edited during a
# long run changes nothing in it (cargo fuzz run would rebuild whenever a
# source changed).
bin_dir="$target_dir/$triple/release"
# Runs target $1's binary with the other arguments (libFuzzer flags and
# corpus folders); a failing input goes to fuzz/artifacts/$1/, as with
# cargo fuzz run.
run_target() {
    local t=$1
    shift
    mkdir -p "artifacts/$t"
    "$bin_dir/$t" -artifact_prefix="artifacts/$t/" "$@"
}
if [[ $sanitizer == address ]]; then
    # What cargo fuzz run adds for ASan (the binaries are run directly).
    export ASAN_OPTIONS="$ASAN_OPTIONS:detect_odr_violation=0"
fi
for t in "${targets[@]}"; do
    if [[ ! -x $bin_dir/$t ]]; then
        echo "no fuzz target binary at $bin_dir/$t after the build" >&2
        exit 1
    fi
done

summary=()
failed=()
for t in "${targets[@]}"; do
    work="$target_dir/corpus/$t"
    log="$target_dir/logs/$t.log"
    mkdir -p "$work" "corpus/$t"
    echo "==> $t: ${secs}s"
    # New inputs go to the run's own corpus (kept across runs in the
    # cache); the committed seeds are read from fuzz/corpus.
    if run_target "$t" "$work" "corpus/$t" \
        -max_total_time="$secs" -timeout=5 -rss_limit_mb=512 -malloc_limit_mb=512 \
        -max_len="$(max_len "$t")" -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$t")
        tail -n 40 "$log"
        echo "(whole log: $log; the input that failed is under fuzz/artifacts/$t/;"
        echo " run it again: (cd fuzz && $bin_dir/$t artifacts/$t/<file>))"
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n 1)
    corpus=$(grep -a -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -n 1 | cut -d' ' -f2)
    line=$(printf '%-18s %-6s runs %-10s exec/s %-7s corpus %-12s peak RSS %s MB' \
        "$t" "$status" "${runs:-?}" "${rate:-?}" "${corpus:-?}" "${rss:-?}")
    echo "$line"
    summary+=("$line")
    if [[ $status == ok ]]; then
        # The run's corpus, minimised (it is kept for the next run).
        kept=$(mktemp -d "$target_dir/corpus/.kept.XXXXXX")
        run_target "$t" "$kept" "$work" \
            -merge=1 -max_len="$(max_len "$t")" >>"$log" 2>&1
        rm -rf "$work"
        mv "$kept" "$work"
    fi
    if [[ $status == ok && ${FUZZ_MERGE:-0} == 1 ]]; then
        # The fewest inputs that reach every edge the committed corpus and
        # the run's reach (edges only, not hit counts: a small corpus).
        merged=$(mktemp -d "$target_dir/corpus/.merged.XXXXXX")
        run_target "$t" "$merged" "corpus/$t" "$work" \
            -merge=1 -use_counters=0 -max_len="$(max_len "$t")" >>"$log" 2>&1
        rm -f "corpus/$t"/*
        mv "$merged"/* "corpus/$t"/
        rmdir "$merged"
        echo "    fuzz/corpus/$t: $(find "corpus/$t" -type f | wc -l) inputs," \
            "$(cat "corpus/$t"/* | wc -c) bytes"
    fi
done

echo
echo "fuzzing summary (${secs}s per target, $((SECONDS - start))s in all):"
printf '  %s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
