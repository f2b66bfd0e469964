#!/usr/bin/env bash
# The GPU device check: what a person with one CUDA GPU runs (in under 8 minutes) to see the training path
# work there and how fast it is. First a 1-worker NCCL Ray Train stage of classification, segmentation and
# detection in bf16 on generated data (benchmarks/gpu_stages.py), then the speed ratios of
# benchmarks/gpu.py side by side. Both say so and exit non-zero on a machine without CUDA.
#
#   make .venv/.installed && benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
"$python" benchmarks/gpu_stages.py
"$python" benchmarks/gpu.py
