#!/usr/bin/env bash
# CI for the C++ runtime: system packages, ONNX Runtime headers, then configure + build + ctest
# twice: a Release build and an AddressSanitizer + UndefinedBehaviorSanitizer build. Both share
# one directory of converted test bundles (converted once). Needs python3 with the repository's
# packages installed (pip install -e ".[dev]" and torch, as .ci/run does first).
#   usage: runtimes/cpp/scripts/ci.sh [BUILD_ROOT]      (default: runtimes/cpp/build-ci)
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${1:-$HERE/build-ci}"
JOBS="$(nproc 2>/dev/null || echo 2)"
[ "$JOBS" -gt 2 ] || JOBS=2
export DEBIAN_FRONTEND=noninteractive

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
[ -f /usr/include/nlohmann/json.hpp ] || need+=(nlohmann-json3-dev)
[ -f /usr/include/openssl/evp.h ] || need+=(libssl-dev)
[ -f /usr/include/png.h ] || need+=(libpng-dev)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$HERE/scripts/fetch_onnxruntime_headers.sh"

BUNDLES="$ROOT/test_bundles"
run_suite() {  # name, extra cmake args...
  local dir="$ROOT/$1"
  shift
  echo "== C++ runtime: $(basename "$dir") =="
  cmake -S "$HERE" -B "$dir" -DFLEXDIT_TEST_BUNDLES="$BUNDLES" "$@" >/dev/null
  cmake --build "$dir" -j "$JOBS"
  ctest --test-dir "$dir" --output-on-failure
}
run_suite release -DCMAKE_BUILD_TYPE=Release
run_suite sanitize -DCMAKE_BUILD_TYPE=Debug -DFLEXDIT_SANITIZE=ON
