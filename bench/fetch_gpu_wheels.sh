#!/usr/bin/env bash
# Download the cp312 wheels bench/gpu.sh installs on the offline GPU machine into .whl/ (ignored by git).
# Run on a machine with PyPI access; copy the repository with .whl/ to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip download --python-version 3.12 --only-binary=:all: --no-deps -d .whl -r bench/requirements-gpu-wheels.txt
du -sh .whl
