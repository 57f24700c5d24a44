#!/usr/bin/env bash
# Make an ONNX Runtime "release directory" for the C++ runtime out of what a Debian/Python
# machine has, without touching the system's apt configuration:
#   headers: Debian 13 (trixie) package libonnxruntime-dev, fetched with `apt-get download`
#            through a private apt configuration (own sources list, state and cache dirs)
#            and unpacked with dpkg-deb -x;
#   library: the onnxruntime Python wheel's capi/libonnxruntime.so.1.* (linked, not copied).
# Result (default DEST = runtimes/cpp/.deps/onnxruntime):
#   DEST/include/onnxruntime_c_api.h ...   DEST/lib/libonnxruntime.so -> wheel library
# which CMake finds by default (or pass -DONNXRUNTIME_ROOT=DEST). An official ONNX Runtime
# release directory (onnxruntime-linux-x64-VERSION/) has the same layout and needs no script.
#
# Versions: the headers' ORT_API_VERSION must be <= the library's (the C API is versioned and
# backward compatible: a 1.32 library serves API version 21 of the 1.21 headers). The runtime
# asks the library for the headers' version at start-up and fails with one line if it is too old.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$HERE/.deps/onnxruntime}"
SUITE="${ORT_HEADERS_SUITE:-trixie}"
MIRROR="${ORT_HEADERS_MIRROR:-http://deb.debian.org/debian}"
PY="${PYTHON:-python3}"

if [ -f "$DEST/include/onnxruntime_c_api.h" ] && [ -e "$DEST/lib/libonnxruntime.so" ]; then
  echo "onnxruntime already prepared in $DEST"; exit 0
fi
LIB="$("$PY" - <<'PYEOF'
import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.1*")))
print(libs[0] if libs else "")
PYEOF
)" || { echo "fetch_onnxruntime_headers: python3 cannot import onnxruntime (pip install onnxruntime)" >&2; exit 1; }
[ -n "$LIB" ] || { echo "fetch_onnxruntime_headers: no libonnxruntime.so.1* in the onnxruntime wheel" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/etc" "$WORK/state/lists/partial" "$WORK/cache/archives/partial" "$WORK/x"
echo "deb $MIRROR $SUITE main" > "$WORK/etc/sources.list"
touch "$WORK/state/status"
APT=(-o "Dir::Etc::sourcelist=$WORK/etc/sources.list" -o "Dir::Etc::sourceparts=/dev/null"
     -o "Dir::State=$WORK/state" -o "Dir::State::status=$WORK/state/status" -o "Dir::Cache=$WORK/cache"
     -o "APT::Sandbox::User=root")
apt-get "${APT[@]}" update -qq
(cd "$WORK" && apt-get "${APT[@]}" download -qq libonnxruntime-dev)
dpkg-deb -x "$WORK"/libonnxruntime-dev_*.deb "$WORK/x"

mkdir -p "$DEST/include" "$DEST/lib"
cp "$WORK"/x/usr/include/onnxruntime/*.h "$DEST/include/"
ln -sf "$LIB" "$DEST/lib/libonnxruntime.so"
ln -sf "$LIB" "$DEST/lib/libonnxruntime.so.1"
HDR=$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$DEST/include/onnxruntime_c_api.h")
LIBV=$(basename "$LIB" | sed 's/libonnxruntime\.so\.//')
echo "onnxruntime headers (ORT_API_VERSION $HDR, $(ls "$WORK"/libonnxruntime-dev_*.deb | xargs basename)) + library $LIBV -> $DEST"
LIBMINOR=$(echo "$LIBV" | cut -d. -f2)
if [ "$HDR" -gt "$LIBMINOR" ]; then
  echo "fetch_onnxruntime_headers: headers (API $HDR) are newer than the library (1.$LIBMINOR); pin onnxruntime>=1.$HDR" >&2
  exit 1
fi
