#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them:
#   bash scripts/test.sh [pytest args...]
# Build tools (Debian packages, when missing and run as root), .venv with the project and its
# test extras, llama.cpp + ik_llama.cpp llama-server builds (cached under ~/.cache/orchestrator;
# the first build takes ~15 min on 2 cores), then ruff, mypy and pytest.
set -euo pipefail
EXTRAS="[test]" . "$(dirname "$0")/setup.sh"

python -m orchestrator engines install llama.cpp
python -m orchestrator engines install ik_llama
# An older llama.cpp whose syntax differs (no draft-mtp/draft-eagle3 spec types): the version contract tests.
python -m orchestrator engines install llama.cpp --version b9093

ruff check orchestrator tests benchmarks
mypy
python -m pytest "$@"
