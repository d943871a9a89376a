# Sourced by scripts/quickstart.sh and scripts/test.sh: build tools, a Python 3.11 venv in .venv,
# the project installed into it (EXTRAS selects optional dependencies, e.g. "[test]").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
for tool in cmake ninja ccache g++ git; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then
    pkgs=()
    for t in "${need[@]}"; do
      case "$t" in ninja) pkgs+=(ninja-build) ;; *) pkgs+=("$t") ;; esac
    done
    echo "installing build tools: ${pkgs[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  else
    echo "missing build tools: ${need[*]} (sudo apt-get install cmake ninja-build ccache g++ git)" >&2
    exit 1
  fi
fi

# The test extras drive a real headless browser on the gateway's dashboard: Debian's chromium
# (tests/e2e/test_dashboard.py; Playwright uses it as it is, it never downloads a browser of its own).
case "${EXTRAS:-}" in *test*)
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "installing chromium (the dashboard's browser tests)" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "note: no chromium: the dashboard's browser tests skip (sudo apt-get install chromium)" >&2
    fi
  fi ;;
esac

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "Python 3.11+ is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:-}"
