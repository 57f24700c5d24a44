#!/usr/bin/env bash
# One command, fresh machine: install, convert the shipped Fashion-MNIST FlexDiT, draw the
# prompts in examples/fashion/prompts.txt and print where the images are.
#   bash examples/fashion/demo.sh            # full default sampler
#   STEPS=10 bash examples/fashion/demo.sh   # quick look
# The bundle is reused while the checkpoint, the options and the compiler are unchanged (a
# content key beside it, BUNDLE.key); the images of the previous run are replaced.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/fashion-demo}
BUNDLE=${BUNDLE:-out/fashion-bundle}
CKPT=models/fashion-flexdit
CONVERT_OPTS=()
if ! python3 -c "import flexdit_export, torch, onnx" 2>/dev/null; then
  echo "installing: torch 2.13.0 (CPU wheel, ~200 MB) and this project with its compiler extra (onnx, onnxscript," \
       "safetensors, onnxruntime): the converter needs them; drawing needs only numpy, onnxruntime, Pillow"
  python3 -m pip install -q torch==2.13.0          # the CPU wheel; any torch>=2.4 works
  python3 -m pip install -q -e ".[compiler]"
  echo "installed"
fi
KEY=$( { sha256sum "$CKPT"/config.json "$CKPT"/model.safetensors | cut -d' ' -f1
         echo "${CONVERT_OPTS[*]-}"
         python3 -c "import flexdit_export; print(flexdit_export.__version__)"
         git -C . rev-parse HEAD:flexdit_export 2>/dev/null || true; } | sha256sum | cut -c1-16 )
if [ -f "$BUNDLE/manifest.json" ] && [ "$(cat "$BUNDLE.key" 2>/dev/null)" = "$KEY" ] \
   && python3 -m flexdit_export.cli verify "$BUNDLE" >/dev/null 2>&1; then
  echo "bundle: reusing $BUNDLE (checkpoint and options unchanged; checksums verified)"
else
  rm -f "$BUNDLE.key"
  python3 -m flexdit_export.cli convert "$CKPT" -o "$BUNDLE" --force ${CONVERT_OPTS[@]+"${CONVERT_OPTS[@]}"}
  echo "$KEY" > "$BUNDLE.key"
fi
python3 -m flexdit_runtime.cli examples/fashion/prompts.txt --bundle "$BUNDLE" -o "$OUT" --force ${STEPS:+--steps "$STEPS"}
echo "images: $OUT/ (grid: $OUT/grid.png)"
