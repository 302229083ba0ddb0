#!/usr/bin/env bash
# Idempotent environment setup: Debian packages + a project virtualenv in .venv with pinned torch.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
for bin in flite sox; do command -v "$bin" >/dev/null 2>&1 || need_apt+=("$bin"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null) \
      || echo "[setup] warning: could not install ${need_apt[*]} (N-best generation needs them)" >&2
  else
    echo "[setup] warning: not root; install Debian packages ${need_apt[*]} for N-best generation" >&2
  fi
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pflm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch and torchaudio in the same command as everything that depends on them (see README).
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
