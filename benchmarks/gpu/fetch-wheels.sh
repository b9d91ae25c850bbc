#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels the GPU bar needs beyond
# what the device image ships (torch, tokenizers, safetensors, accelerate and
# huggingface-hub are there; nnsight and its own needs are not). They land in
# .whl/ (ignored by git); `run` carries them with `carry: [".whl"]`.
#
#   bash benchmarks/gpu/fetch-wheels.sh        # from the repository root
#
# Versions are the ones the CPU test suite runs with, so the GPU numbers are
# of the same code paths.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
  nnsight==0.8.1 greenlet==3.5.6 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 websocket-client==1.9.2 zstandard==0.25.0 \
  transformers==5.24.0 peft==0.21.2 regex==2026.11.19
ls .whl
du -sh .whl
