#!/usr/bin/env bash
# The GPU checks in one run (about 5 minutes on one H100): CUDA-marked tests, then the scan benchmark on
# the GPU. Results go to ${OUT:-results/gpu}. Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/gpu}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python -c "import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); \
import mambaclinix.ops.backend as b; print('mamba_ssm', b.has_mamba_ssm(), 'causal_conv1d', b.has_causal_conv1d())" \
  > "$out/versions.txt" 2>&1
timeout 240 python -m pytest tests/test_cuda.py -m cuda -q -rs > "$out/pytest_cuda.txt" 2>&1
echo "pytest rc=$?" >> "$out/pytest_cuda.txt"
timeout 300 python benchmarks/bench_scan.py --device cuda --repeats 5 --json "$out/scan_cuda.json" \
  > "$out/scan_cuda.md" 2> "$out/scan_cuda.log"
echo "bench rc=$?" >> "$out/scan_cuda.log"
tail -3 "$out/pytest_cuda.txt"; cat "$out/scan_cuda.md"
