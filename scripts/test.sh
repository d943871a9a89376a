#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
#   bash scripts/test.sh [pytest args...]
# Installs: build tools (Debian packages, when missing and run as root), a Python 3.11 venv
# in .venv with the project and its test extras, and llama.cpp + ik_llama.cpp llama-server
# builds (cached under ~/.cache/orchestrator, so later runs skip the ~15 min build).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in cmake ninja ccache g++ git; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then
    pkgs=()
    for t in "${need[@]}"; do
      case "$t" in ninja) pkgs+=(ninja-build) ;; g++) pkgs+=(g++) ;; *) pkgs+=("$t") ;; esac
    done
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
  else
    echo "missing build tools: ${need[*]} (install them, e.g. apt-get install cmake ninja-build ccache g++)" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' || { echo "Python 3.11+ required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check -e '.[test]'

# Engines for the contract and end-to-end tests (no-op when the cached build exists).
python -m orchestrator.provision llama.cpp ik_llama

ruff check orchestrator tests benchmarks
mypy
python -m pytest "$@"
