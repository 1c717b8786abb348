#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with torch and this project (editable, with the
# test extras). Safe to run again: it only installs what is missing.
#   TORCH_SPEC   the torch requirement to install when torch is missing (default: torch==2.13.0, the CPU build our
#                CPU machines carry on disk; on a GPU machine install your CUDA torch first, or set TORCH_SPEC).
#   VENV         where the environment goes (default: .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install --quiet -e ".[test]"
# The page test (tests/test_serve_page.py) drives Debian's chromium through chromedriver. Installed when missing, where
# apt-get is there and this runs as root; otherwise that one test skips with its reason.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "installing chromium and chromium-driver (apt-get) for the server's page test ..."
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
                >/tmp/bark-kernels-setup-apt.log 2>&1; then
            echo "note: chromium could not be installed (see /tmp/bark-kernels-setup-apt.log): the page test will skip"
        fi
    else
        echo "note: no chromium/chromedriver and no root apt-get here: the server's page test will skip"
    fi
fi
"$PY" -c "import torch, bark_kernels; print('set-up done: torch', torch.__version__, '| bark_kernels', bark_kernels.__version__)"
