#!/usr/bin/env bash
# The whole pipeline on tiny random LLaVA-1.5 and Qwen2-VL checkpoints built offline:
# profile (retain, forget) -> accessor -> apply (one-shot and progressive) -> eval -> load -> generate,
# and, where matplotlib is installed (pip install 'kvwctl[plot]'), the accessor and eval report as PNGs.
#
#   bash examples/tiny_demo.sh [WORKDIR]        # default: ./tiny-demo (replaced on every run)
#
# The checkpoints are random (they know nothing), so this shows the mechanics, not forgetting.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=${1:-tiny-demo}
# Replace only a directory this script made (it leaves a marker file), never anything else.
if [ -e "$work" ] && [ -n "$(ls -A "$work" 2>/dev/null)" ] && [ ! -e "$work/.kvw-tiny-demo" ]; then
  echo "Error: $work exists and was not made by this script; give another directory" >&2
  exit 1
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/.kvw-tiny-demo"
work=$(cd "$work" && pwd)

python - "$work/data" <<'PY'
import sys
from pathlib import Path
from kvwctl.testing import write_samples
root = Path(sys.argv[1])
write_samples(root / "forget.jsonl", count=4, with_images=True)
write_samples(root / "retain.jsonl", count=12, with_images=True, offset=4)
PY

for model in llava qwen2_vl; do
  echo "== $model" >&2
  run="$work/$model-run"
  mkdir -p "$run"
  # A tiny checkpoint in the on-disk layout the Hub's checkpoints use, in several shards.
  python -m kvwctl.testing "$model" "$run/model" >/dev/null
  cat > "$run/kvw.toml" <<TOML
model = "model"
workdir = "kvw-run"
gamma = 0.5
layers = "1:2"

[splits]
forget = "../data/forget.jsonl"
retain = "../data/retain.jsonl"
TOML
  (
    cd "$run"
    kvwctl profile --split retain
    kvwctl profile --split forget
    kvwctl accessor
    kvwctl apply
    kvwctl apply --progressive --out kvw-run/unlearned-progressive
    echo "-- progressive vs one-shot exposure" >&2
    python "$here/compare_exposures.py" kvw-run/accessor.safetensors kvw-run/unlearned-progressive.exposure.safetensors >&2
    for checkpoint in model kvw-run/unlearned kvw-run/unlearned-progressive; do
      printf '%s generates: ' "$checkpoint" >&2
      python "$here/generate.py" "$checkpoint" "Who is this person?" --image ../data/images/p0.png >&2
    done
    # kvw-run/unlearned against kvw.toml's model on both splits -> kvw-run/eval.json (+ .samples.jsonl)
    kvwctl eval --max-new-tokens 8
    if python -c 'import matplotlib' 2>/dev/null; then
      kvwctl plot kvw-run/accessor.safetensors   # -> kvw-run/accessor.png (gamma and layers from kvw.toml)
      kvwctl plot kvw-run/eval.json              # -> kvw-run/eval.png
    fi
  )
done
echo "tiny demo finished: $work" >&2
