#!/usr/bin/env bash
# Model, scan and block-profile benchmarks on one GPU, each section under its own timeout (about 4
# minutes on one H200 with the default sizes). Called by gpu_check.sh; runs alone too.
#
# Everything goes to $RESULTS (default results/gpu_results). Knobs (environment):
#   DEVICE=cuda  SIZES="64 96 128"  BATCH=2  DTYPES="fp32 bf16"  MODELS="" (all)  WARMUP=3  REPEATS=6
#   SW_REPEATS=2
#   SCAN_LENGTHS="512 4096 16384"  PROFILE_SIZE=(last of SIZES)  PYTHON=(python, else python3)
#   TIMEOUT_SCALE=1 (multiplies every timeout; a CPU dry run needs more)
# Dry run on a CPU (small and quick, checks the script end to end):
#   DEVICE=cpu SIZES=64 BATCH=1 MODELS="mambaclinix nnunet_plain" WARMUP=1 REPEATS=1 SCAN_LENGTHS=512 \
#     TIMEOUT_SCALE=4 bash benchmarks/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
res="${RESULTS:-results/gpu_results}"
mkdir -p "$res"
DEVICE="${DEVICE:-cuda}"
SIZES="${SIZES:-64 96 128}"
BATCH="${BATCH:-2}"
DTYPES="${DTYPES:-fp32 bf16}"
MODELS="${MODELS:-}"
WARMUP="${WARMUP:-3}"
REPEATS="${REPEATS:-6}"
SW_REPEATS="${SW_REPEATS:-2}"
SCAN_LENGTHS="${SCAN_LENGTHS:-512 4096 16384}"
PROFILE_SIZE="${PROFILE_SIZE:-${SIZES##* }}"
scale="${TIMEOUT_SCALE:-1}"
t() { echo $(( $1 * scale )); }
models_arg=()
[ -n "$MODELS" ] && models_arg=(--models $MODELS)

for dt in $DTYPES; do
  # shellcheck disable=SC2086
  timeout "$(t 130)" "$PY" benchmarks/bench_models.py --device "$DEVICE" --dtype "$dt" --sizes $SIZES \
    --batch "$BATCH" --warmup "$WARMUP" --repeats "$REPEATS" --sw-repeats "$SW_REPEATS" "${models_arg[@]}" \
    --json "$res/models_${DEVICE}_${dt}.json" --markdown "$res/models_${DEVICE}_${dt}.md" \
    --plot "$res/models_${DEVICE}_${dt}.png" > "$res/models_${DEVICE}_${dt}.log" 2>&1
  echo "bench_models $dt rc=$?" >> "$res/models_${DEVICE}_${dt}.log"
done

# the PyTorch fallback, and the Triton kernel where the installed mambaclinix has one and triton imports
scan_backends="$("$PY" -c "from mambaclinix.ops import backend as b; import sys
d = sys.argv[1]
print(' '.join(['reference', 'numba'] if d == 'cpu' else ['reference', 'chunked']
               + (['triton'] if d != 'cpu' and getattr(b, 'has_triton', lambda: False)() else [])
               + (['cuda'] if d != 'cpu' and b.has_mamba_ssm() else [])))" "$DEVICE" 2>/dev/null || echo reference chunked)"
# shellcheck disable=SC2086
timeout "$(t 80)" "$PY" benchmarks/bench_scan.py --device "$DEVICE" --lengths $SCAN_LENGTHS --repeats 3 \
  --backends $scan_backends --json "$res/scan_${DEVICE}.json" > "$res/scan_${DEVICE}.md" 2> "$res/scan_${DEVICE}.log"
echo "bench_scan rc=$?" >> "$res/scan_${DEVICE}.log"

timeout "$(t 45)" "$PY" benchmarks/profile_blocks.py --model mambaclinix --device "$DEVICE" --size "$PROFILE_SIZE" \
  --batch "$BATCH" --repeats 5 --inner --json "$res/profile_${DEVICE}.json" \
  > "$res/profile_${DEVICE}.md" 2> "$res/profile_${DEVICE}.log"
echo "profile_blocks rc=$?" >> "$res/profile_${DEVICE}.log"
exit 0
