#!/usr/bin/env bash
# One command, fresh machine: install, convert the shipped Fashion-MNIST FlexDiT, draw the
# prompts in examples/fashion/prompts.txt and print where the images are.
#   bash examples/fashion/demo.sh            # full default sampler
#   STEPS=10 bash examples/fashion/demo.sh   # quick look
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/fashion-demo}
BUNDLE=${BUNDLE:-out/fashion-bundle}
if ! python3 -c "import flexdit_export, torch, onnx" 2>/dev/null; then
  python3 -m pip install -q torch==2.13.0          # the CPU wheel; any torch>=2.4 works
  python3 -m pip install -q -e ".[compiler]"
fi
python3 -m flexdit_export.cli convert models/fashion-flexdit -o "$BUNDLE" --force
python3 -m flexdit_runtime.cli examples/fashion/prompts.txt --bundle "$BUNDLE" -o "$OUT" ${STEPS:+--steps "$STEPS"}
echo "images: $OUT/ (grid: $OUT/grid.png)"
