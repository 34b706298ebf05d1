#!/usr/bin/env bash
# Set-up and the project's jobs in one place: on a fresh machine with Python >= 3.11 and nothing
# else, each command first makes (or updates) the virtual environment, then runs.
#
#   bash dev.sh quickstart [WORKDIR]   # the main job: the bundled example end to end
#   bash dev.sh test [PYTEST ARGS]     # ruff format --check, ruff check, mypy, pytest
#   bash dev.sh demo [WORKDIR]         # every stage on tiny random checkpoints
#   bash dev.sh shell                  # a shell with the environment active
#
# The environment is $KVW_VENV (default .venv beside this file). It is (re)installed when it is
# missing or pyproject.toml changed since the last install. torch comes from $KVW_TORCH (default
# "torch==2.14.1 torchvision==0.29.1", which pip finds as CPU-usable wheels where they are
# cached locally); for a GPU build set e.g.
#   KVW_TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu128" bash dev.sh test
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${KVW_VENV:-$here/.venv}
torch_spec=${KVW_TORCH:-torch==2.14.1 torchvision==0.29.1}

find_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "Error: kvwctl needs Python >= 3.11 (python3.11 or newer on PATH)" >&2
  exit 1
}

ensure_venv() {
  local stamp="$venv/.kvw-installed" wanted
  wanted="$(cat "$here/pyproject.toml") $torch_spec"
  wanted=$(printf '%s' "$wanted" | sha256sum | cut -d' ' -f1)
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    return
  fi
  echo "dev.sh: installing into $venv (once; again when pyproject.toml changes)" >&2
  [ -x "$venv/bin/python" ] || "$(find_python)" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086 # the spec is a list of requirements
  "$venv/bin/python" -m pip install -q $torch_spec
  "$venv/bin/python" -m pip install -q -e "$here[dev,examples]"
  echo "$wanted" >"$stamp"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  quickstart | test | demo | shell) ;;
  *)
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
ensure_venv
export PATH="$venv/bin:$PATH"
case "$command" in
  quickstart) exec bash "$here/examples/quickstart.sh" "$@" ;;
  demo) exec bash "$here/examples/tiny_demo.sh" "$@" ;;
  shell) exec "${SHELL:-bash}" ;;
  test)
    cd "$here"
    ruff format --check kvwctl tests examples benchmarks
    ruff check kvwctl tests examples benchmarks
    mypy
    python -m pytest "$@"
    ;;
esac
