#!/usr/bin/env bash
# All GPU checks in one run (about 6 minutes on one H200): the CUDA-marked tests, then gpu_bench.sh
# (model tables in fp32 and bf16 autocast, the scan benchmark, the per-block profile). Needs only the
# repository on PYTHONPATH (no pip install): monai and dynamic-network-architectures are optional (their
# models show as unavailable without them).
#
# Results: $OUT/summary.md and $OUT/gpu_results.tgz (the folder results/gpu_results: JSON, Markdown,
# PNG and logs). Usage:  OUT=/some/dir bash benchmarks/gpu_check.sh
# CPU dry run (checks the script end to end in a few minutes, no GPU needed):
#   OUT=/tmp/dry DEVICE=cpu SIZES=64 BATCH=1 MODELS="mambaclinix nnunet_plain" WARMUP=1 REPEATS=1 \
#     SCAN_LENGTHS=512 TIMEOUT_SCALE=4 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
out="${OUT:-results/gpu}"
export RESULTS="${RESULTS:-results/gpu_results}"
export DEVICE="${DEVICE:-cuda}"
export SIZES="${SIZES:-64 96 128}"
export WARMUP="${WARMUP:-3}"
export REPEATS="${REPEATS:-6}"
scale="${TIMEOUT_SCALE:-1}"
mkdir -p "$out" "$RESULTS"
start=$(date +%s)
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
timeout 60 "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'); \
import mambaclinix; from mambaclinix.models import create_model; import mambaclinix.ops.backend as b; \
print('mambaclinix imports; mamba_ssm', b.has_mamba_ssm(), 'causal_conv1d', b.has_causal_conv1d()); \
import importlib.util as u; print({m: bool(u.find_spec(m)) for m in ('monai', 'dynamic_network_architectures')})" \
  > "$RESULTS/versions.txt" 2>&1
timeout $((90 * scale)) "$PY" -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider \
  > "$RESULTS/pytest_cuda.txt" 2>&1
echo "pytest rc=$?" >> "$RESULTS/pytest_cuda.txt"
bash benchmarks/gpu_bench.sh
end=$(date +%s)

{
  echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), $((end - start)) s)"
  echo
  echo '```'
  cat "$RESULTS/versions.txt"
  echo '```'
  echo
  echo "## CUDA tests"
  echo '```'
  tail -5 "$RESULTS/pytest_cuda.txt"
  echo '```'
  for f in "$RESULTS"/models_*.md; do
    [ -e "$f" ] || continue
    echo; echo "## $(basename "$f" .md)"; echo; cat "$f"
  done
  for f in "$RESULTS"/*.log; do
    grep -H "rc=" "$f" | sed 's/^/    /'
  done
  echo; echo "## Selective scan ($DEVICE)"; echo; cat "$RESULTS/scan_${DEVICE}.md" 2>/dev/null
  echo; echo "## Per-block profile (mambaclinix, $DEVICE)"; echo; cat "$RESULTS/profile_${DEVICE}.md" 2>/dev/null
} > "$out/summary.md"
tar czf "$out/gpu_results.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
cat "$out/summary.md" | head -60
