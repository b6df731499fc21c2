#!/usr/bin/env bash
# The GPU performance checks of one session in one run (estimated 7 minutes on one H200), each under its own
# timeout: MambaClinix's train step against PlainConvUNet per MAC (bf16 autocast, 128³, batch 2),
# torch.compile of the paper preset against eager mode, the Triton scan's tile sweep against the copy
# bandwidth and the other backends, and the loader's patches per second per worker on this machine's
# CPU beside the GPU's consumption (batch ÷ step time). Needs only the repository on PYTHONPATH.
#
# Results under $OUT (default results/gpu_perf): JSON, Markdown and logs, and summary.md. Knobs
# (environment): DEVICE=cuda SIZE=128 BATCH=2 DTYPE=bf16 ROUNDS=3 TIMEOUT_SCALE=1 PYTHON=python.
# CPU dry run (checks the script end to end in a few minutes):
#   OUT=/tmp/perf DEVICE=cpu SIZE=64 BATCH=1 DTYPE=fp32 ROUNDS=1 TIMEOUT_SCALE=4 TRITON_INTERPRET=1 \
#     TUNE_ARGS="--L 64 --E 8 --N 4 --batch 1 --chunks 32 --tiles 64 --warps 4 --repeats 1" \
#     COMPILE_MODEL=mambaclinix_tiny LOADER_PATCH=32 bash benchmarks/gpu_perf.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
out="${OUT:-results/gpu_perf}"
DEVICE="${DEVICE:-cuda}"
SIZE="${SIZE:-128}"
BATCH="${BATCH:-2}"
DTYPE="${DTYPE:-bf16}"
ROUNDS="${ROUNDS:-3}"
TUNE_ARGS="${TUNE_ARGS:-}"
COMPILE_MODEL="${COMPILE_MODEL:-mambaclinix_paper}"
LOADER_PATCH="${LOADER_PATCH:-$SIZE}"
scale="${TIMEOUT_SCALE:-1}"
t() { echo $(( $1 * scale )); }
mkdir -p "$out"
start=$(date +%s)

timeout "$(t 150)" "$PY" benchmarks/bench_models.py --device "$DEVICE" --dtype "$DTYPE" --sizes "$SIZE" \
  --batch "$BATCH" --models mambaclinix nnunet_plain --warmup 3 --repeats 6 --no-sw \
  --json "$out/models.json" --markdown "$out/models.md" > "$out/models.log" 2>&1
echo "bench_models rc=$?" >> "$out/models.log"

# shellcheck disable=SC2086
timeout "$(t 150)" "$PY" benchmarks/tune_triton_scan.py --device "$DEVICE" $TUNE_ARGS \
  --json "$out/triton_tiles.json" > "$out/triton_tiles.md" 2> "$out/triton_tiles.log"
echo "tune_triton_scan rc=$?" >> "$out/triton_tiles.log"

timeout "$(t 240)" "$PY" benchmarks/bench_compile.py --device "$DEVICE" --dtype "$DTYPE" \
  --model "$COMPILE_MODEL" --size "$SIZE" --batch "$BATCH" --rounds "$ROUNDS" \
  --json "$out/compile.json" > "$out/compile.log" 2>&1
echo "bench_compile rc=$?" >> "$out/compile.log"

timeout "$(t 60)" "$PY" benchmarks/bench_loader.py --patch "$LOADER_PATCH" --rounds "$ROUNDS" \
  --json "$out/loader.json" > "$out/loader.log" 2>&1
echo "bench_loader rc=$?" >> "$out/loader.log"

end=$(date +%s)
{
  echo "# GPU performance checks ($(date -u '+%Y-%m-%d %H:%M UTC'), $((end - start)) s, $DEVICE, $DTYPE)"
  echo; echo "## Train step per MAC"; echo; cat "$out/models.md" 2>/dev/null
  echo; echo "## Triton scan tiles"; echo; cat "$out/triton_tiles.md" 2>/dev/null
  echo; echo "## torch.compile"; echo; grep -E "^(train|inference|logits)" "$out/compile.log" 2>/dev/null
  echo; echo "## Loader workers this GPU needs"; echo
  "$PY" - "$out" "$BATCH" <<'EOF' 2>&1
import json, math, sys
from pathlib import Path
out, batch = Path(sys.argv[1]), int(sys.argv[2])
loader = json.loads((out / "loader.json").read_text())["results"][-1]
rate = loader["patches_per_s"]["per-patch"]
models = json.loads((out / "models.json").read_text())
for r in models["rows"]:
    step = r.get("timing", {}).get("train_median_s")
    if step:
        need = batch / step
        print(f"- {r['model']}: {need:.1f} patches/s ({batch} / {step:.3f} s); one worker: {rate:.2f} "
              f"patches/s at {loader['patch']}³ -> {math.ceil(need / rate)} workers")
EOF
  for f in "$out"/*.log; do grep -H "rc=" "$f" | sed 's/^/    /'; done
} > "$out/summary.md"
cat "$out/summary.md"
