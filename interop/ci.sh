#!/usr/bin/env bash
# Interop CI hook: builds the binaries, sets up the Python client's venv, runs the quick
# matrix for both clients and prints matrix.md. Exit status: the runner's (non-zero when a
# cell fails).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
cargo build --locked -p sibyl-gateway -p sibyl-interop
interop/clients/python/setup.sh
out="$(mktemp -d "${TMPDIR:-/tmp}/sibyl-interop.XXXXXX")"
status=0
"$target_dir/debug/sibyl-interop" --quick --clients rust,python --output "$out" || status=$?
cat "$out/matrix.md"
echo "interop logs: $out/logs"
exit "$status"
