#!/usr/bin/env bash
# The GPU suite's two steps (benchmarks/gpu_suite.py says what it checks):
#   bash benchmarks/gpu_suite.sh fetch      here, with PyPI: pinned wheels for the GPU machine
#                                           (CPython 3.12, manylinux x86-64) into .whl/
#   bash benchmarks/gpu_suite.sh run OUT    on the GPU machine (no network): install .whl/ into
#                                           /tmp/site, then run the suite into OUT
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=$(grep -v '^#' benchmarks/gpu_wheels.txt | sed '/^\s*$/d')
case "${1:-}" in
  fetch)
    mkdir -p .whl
    # shellcheck disable=SC2086
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $wheels
    du -sh .whl
    ;;
  run)
    out=${2:?usage: gpu_suite.sh run OUT}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/gpu_suite.py "$out"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_suite.sh fetch | run OUT" >&2
    exit 2
    ;;
esac
