# Sourced by run_pipeline.sh and run_tests.sh: makes sure .venv (from the pinned requirements.txt, runtime, and
# requirements-dev.txt, the test tools) and the Debian packages exist.  Usage: source scripts/setup.sh [extra Debian packages...]
# Installs Debian packages with apt-get when running as root; otherwise says what to install and stops.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PY="$VENV/bin/python"

need_debs=("$@")
missing=()
for pkg in "${need_debs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# Python >= 3.10 for the server side (the device side is Python 3.6 and needs no venv here).
host_py=""
for cand in python3.11 python3.12 python3.10 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    host_py="$(command -v "$cand")"; break
  fi
done
if [ -z "$host_py" ]; then
  echo "setup: need Python >= 3.10 with venv (e.g. apt-get install python3 python3-venv)" >&2
  exit 1
fi

stamp="$VENV/.requirements.sha256"
reqs=("$REPO_ROOT/requirements.txt" "$REPO_ROOT/requirements-dev.txt")
want="$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)"  # both files: a change to either re-installs
if [ ! -x "$PY" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements.txt + requirements-dev.txt into $VENV (pinned; torch 2.13.0 CPU wheel)" >&2
  [ -x "$PY" ] || "$host_py" -m venv "$VENV"
  "$PY" -m pip install -q --disable-pip-version-check -r "${reqs[0]}" -r "${reqs[1]}"
  echo "$want" > "$stamp"
fi
export PYTHONDONTWRITEBYTECODE=1
