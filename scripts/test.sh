#!/usr/bin/env bash
# The project's test command (the README's second command; .ci/run runs it).
# Builds what the lab needs (cached), checks format and lints, then runs the
# unit tests and the end-to-end tests in the lab, and fuzzes the decoders
# briefly (scripts/fuzz.sh). Needs root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
step() { printf '\n==> %s (at %ds)\n' "$*" "$((SECONDS - start))"; }

# The build (target/, about 4 GB) and the cache (images, the fuzz build) need
# room; a full disk shows up late and oddly (a linker's bus error), so say so now.
free_gb=$(df -P --block-size=1G . | awk 'NR == 2 { print $4 }')
echo "free disk space where the build goes: ${free_gb} GB"
[ "$free_gb" -ge 8 ] || echo "warning: under 8 GB free: the build may fail for want of space (cargo clean, or free some)" >&2
step "images (Debian packages, static binaries, guest kernel, lab node)"
./images/build.sh >/dev/null
step "test tools (Debian's promtool for the metrics tests, Debian's chromium for the web console tests, openapi-spec-validator)"
(STEP=test-tools; source images/lib.sh; need_pkgs prometheus chromium)
python3 -m openapi_spec_validator --help >/dev/null 2>&1 ||
    python3 -m pip install --quiet --disable-pip-version-check openapi-spec-validator
step "the OpenAPI document validates (ftd/openapi.json)"
python3 -m openapi_spec_validator ftd/openapi.json
step "cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
step "cargo clippy"
cargo clippy --workspace --all-targets --release --locked -- -D warnings
step "cargo test (unit and end-to-end)"
cargo test --workspace --release --locked
step "fuzz (short run: each target 20 s; the long run is FUZZ_SECS=600)"
FUZZ_SECS=20 ./scripts/fuzz.sh
step "all tests passed in $((SECONDS - start))s"
