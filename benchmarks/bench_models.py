"""Cost of whole segmentation networks: parameters, MACs, train-step and inference time, peak memory and
whole-volume sliding-window time, for MambaClinix, its ablations and the architectures users compare.

The models and their exact configurations are in ``benchmarks/_zoo.py`` (MambaClinix paper preset,
gating "mul", no Mamba layers; nnU-Net's PlainConvUNet and ResEnc-M as its 3d_fullres plans build them;
MONAI's SwinUNETR, SegResNet and UNETR). Every figure is also given as a ratio against ``nnunet_plain``
measured in the same run.

Per model and patch size:

- **params**, **MACs** of one forward pass at batch 1 (``benchmarks/_flops.py``: FlopCounterMode on the
  meta device for conv and matmul, plus the selective scan analytically; norms and element-wise ops are
  not counted).
- **train step**: ``zero_grad``, forward, cross-entropy on the logits, backward, Adam step (lr 1e-4,
  eps 1e-5, weight decay 1e-5 as the paper trains), on a batch of random patches and labels.
- **inference**: forward in ``eval()`` under ``torch.inference_mode``, reported per patch (batch time
  divided by the batch size).
- **peak memory**: CUDA: ``torch.cuda.max_memory_allocated`` during the phase (weights, gradients and
  Adam state included). CPU: the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each phase) minus its resident set before the model was built.
- **sliding window**: :func:`mambaclinix.inference.sliding_window_inference` over one volume of
  ``--volume`` voxels (default: 1.5 × the patch per axis, i.e. 2 windows per axis = 8 windows) with
  ``roi_size`` = patch, ``sw_batch_size`` = batch, overlap 0.5, Gaussian weighting, no mirroring.

Times are medians over ``--rounds`` × ``--repeats`` timed calls after ``--warmup`` untimed ones. On the
CPU each (model, size, round) runs in a fresh process (so the peak resident set is the model's own) and
the rounds are interleaved across models, so that noise from other processes hits every model alike.
On CUDA one process runs everything and the peak is reset per phase; ``cudnn.benchmark`` is off unless
``--cudnn-benchmark`` (nnU-Net trains with it on; its autotuning makes the first calls of every new shape
slow, so the warm-up must then be longer).

    python benchmarks/bench_models.py --sizes 64 96 --batch 2 --json docs/models_cpu.json \
        --markdown docs/models_cpu.md --plot docs/models_cpu.png
    python benchmarks/bench_models.py --device cuda --dtype bf16 --sizes 64 128 --batch 2 --json ...
    python benchmarks/bench_models.py --macs-only --sizes 128 --batch 1        # counts only, any machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    current_memory,
    machine_info,
    peak_since_reset,
    reset_peak,
    time_call,
)
from _flops import build_on_meta, count_macs, count_params  # noqa: E402
from _zoo import BASELINE, MODELS, NUM_CLASSES, Unavailable, build_model  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# one model, one size: timings and memory (runs in the child process on CPU)


def _timed(fn, device, n: int) -> list[float]:
    return time_call(fn, device, n, warmup=0)


def scan_backend_used(device: torch.device) -> str:
    from mambaclinix.ops.backend import resolve_backend

    return resolve_backend(None, device)


def measure(name: str, size: int, args, sw: bool = True) -> dict:
    """Time and memory of one model at one patch size (see the module docstring for what each is)."""
    device = torch.device(args.device)
    amp = DTYPES[args.dtype]
    patch = (size,) * 3
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
        torch.cuda.empty_cache()
    base = current_memory(device)
    model = build_model(name, patch).to(device)
    x = torch.randn(args.batch, 1, *patch, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch, *patch), device=device)

    def autocast():
        if amp is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=amp)

    def forward(inp):
        with autocast():
            out = model(inp)
        return out[0] if isinstance(out, (list, tuple)) else out

    res: dict = {}
    # inference
    model.eval()
    reset_peak(device)
    with torch.inference_mode():
        _timed(lambda: forward(x), device, args.warmup)
        res["infer_s"] = [t / args.batch for t in _timed(lambda: forward(x), device, args.repeats)]
    res["infer_peak_bytes"] = peak_since_reset(device) - base
    # training
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-5, weight_decay=1e-5)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x).float(), labels)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    _timed(train_step, device, max(args.warmup, 1))  # the first step allocates Adam's state
    res["train_s"] = _timed(train_step, device, args.repeats)
    res["train_peak_bytes"] = peak_since_reset(device) - base
    # sliding window over a whole volume (after training, so that the training peak never includes it)
    opt.state.clear()  # Adam's moments
    model.zero_grad(set_to_none=True)
    model.eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if sw and not args.no_sw and (args.sw_sizes is None or size in args.sw_sizes):
        from mambaclinix.inference import sliding_window_inference

        vol = tuple(int(round(v)) for v in (args.volume or [1.5 * size] * 3))
        volume = torch.randn(1, 1, *vol, device=device)
        with torch.inference_mode():

            def run_sw():
                return sliding_window_inference(
                    volume, patch, args.batch, forward, overlap=0.5, mode="gaussian"
                )

            res["sw_s"] = _timed(run_sw, device, args.sw_repeats)
        res["sw_volume"] = vol
        del volume
    res["scan_backend"] = scan_backend_used(device) if name.startswith("mambaclinix") else None
    return res


def _child(name: str, size: int, args, sw: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--sizes", str(size)]
    for key in ("device", "dtype", "batch", "warmup", "repeats", "sw_repeats", "threads", "cpu_allocator"):
        val = getattr(args, key)
        if val is not None:
            cmd += [f"--{key.replace('_', '-')}", str(val)]
    if args.volume:
        cmd += ["--volume", *map(str, args.volume)]
    if not sw or args.no_sw or (args.sw_sizes is not None and size not in args.sw_sizes):
        cmd.append("--no-sw")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _run_inline(name: str, size: int, args, sw: bool = True) -> dict:
    try:
        return measure(name, size, args, sw)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Unavailable as e:
        return {"error": str(e)}
    except Exception as e:  # one model failing must not lose the others' results
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _merge(acc: dict | None, new: dict) -> dict:
    if acc is None or "error" in new:
        return dict(new) if acc is None or "error" in new else acc
    if "error" in acc:
        return acc
    for key in ("infer_s", "train_s", "sw_s"):
        if key in new:
            acc[key] = acc.get(key, []) + new[key]
    for key in ("infer_peak_bytes", "train_peak_bytes"):
        acc[key] = max(acc[key], new[key])
    return acc


# ----------------------------------------------------------------------------------------------------
# the whole run


def counts(name: str, size: int) -> dict:
    """Parameters and batch-1 forward MACs (meta device, no compute)."""
    try:
        build = lambda: build_model(name, (size,) * 3)  # noqa: E731
        macs = count_macs(build, (1, 1, size, size, size))
        params = count_params(build_on_meta(build))
    except Unavailable as e:
        return {"error": str(e)}
    except (ValueError, RuntimeError) as e:  # e.g. a 1-voxel bottleneck that InstanceNorm rejects
        return {"error": f"cannot run at {size}³: {str(e).splitlines()[0][:150]}"}
    return {"params": params, "macs": macs}


def run(args, on_update=None) -> dict:
    """All (model, size) cells; ``on_update(result)`` is called after each measurement (partial results
    survive a timeout)."""
    device = torch.device(args.device)
    models = args.models or list(MODELS)
    cells: dict[tuple[str, int], dict] = {}
    for size in args.sizes:
        for name in models:
            cells[(name, size)] = {"model": name, "size": size, **counts(name, size)}
    t_start = time.perf_counter()
    result = {
        "machine": machine_info(device),
        "versions": _versions(),
        "config": {
            "device": args.device,
            "dtype": args.dtype,
            "autocast": args.dtype != "fp32",
            "batch": args.batch,
            "sizes": args.sizes,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "sw_repeats": args.sw_repeats,
            "threads": torch.get_num_threads(),
            "scan_backend": scan_backend_used(device),
            "cudnn_benchmark": bool(args.cudnn_benchmark) if device.type == "cuda" else None,
            # PyTorch's defaults: cuDNN convolutions may use TF32 on Ampere and later, matmuls may not
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
            "macs_counted_at_batch": 1,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "complete": False,
        },
        "rows": list(cells.values()),
    }
    if not args.macs_only:
        isolate = device.type == "cpu"
        for rnd in range(args.rounds):
            for size in args.sizes:
                for name in models:
                    cell = cells[(name, size)]
                    if "params" not in cell:
                        continue
                    t0 = time.perf_counter()
                    run_one = _child if isolate else _run_inline
                    new = run_one(name, size, args, sw=rnd == 0)  # the sliding window in the first round only
                    cell["timing"] = _merge(cell.get("timing"), new)
                    _medians(cell["timing"])
                    result["config"]["wall_s"] = round(time.perf_counter() - t_start, 1)
                    took = time.perf_counter() - t0
                    where = f"round {rnd + 1}/{args.rounds} {name:22s} {size:4d}^3"
                    print(f"  {where} {took:7.1f} s  {_brief(new)}", file=sys.stderr, flush=True)
                    if on_update:
                        on_update(result)
    result["config"]["complete"] = True
    result["config"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def _medians(timing: dict) -> None:
    if "error" in timing:
        return
    for key in ("infer_s", "train_s", "sw_s"):
        if key in timing:
            timing[key.replace("_s", "_median_s")] = statistics.median(timing[key])


def _brief(res: dict) -> str:
    if "error" in res:
        return res["error"]
    parts = [
        f"train {statistics.median(res['train_s']):.3f} s",
        f"infer {statistics.median(res['infer_s']):.3f} s/patch",
    ]
    if "sw_s" in res:
        parts.append(f"sw {statistics.median(res['sw_s']):.2f} s")
    parts.append(f"peak {res['train_peak_bytes'] / 2**20:.0f} MiB")
    return ", ".join(parts)


def _versions() -> dict:
    """Versions of torch and the packages compared (from the imported modules: they may come from
    PYTHONPATH rather than an installed distribution)."""
    import importlib

    out = {"torch": torch.__version__}
    for mod in ("mambaclinix", "monai", "dynamic_network_architectures", "numba"):
        try:
            module = importlib.import_module(mod)
            out[mod] = getattr(module, "__version__", None)
            if out[mod] is None:
                from importlib.metadata import version

                out[mod] = version(mod.replace("_", "-"))
        except Exception:
            out[mod] = None
    return out


# ----------------------------------------------------------------------------------------------------
# reporting


def _ratio(v, base) -> str:
    return f"{v / base:.2f}" if v is not None and base else "n/a"


def format_macs(result: dict) -> str:
    """Parameters and forward MACs by kind, per patch size (batch 1)."""
    lines = [
        "| patch | model | params | conv GMACs | matmul GMACs | scan GMACs | total GMACs | GFLOPs (2×MACs) "
        f"| MACs ratio vs {BASELINE} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in result["config"]["sizes"]:
        rows = [r for r in result["rows"] if r["size"] == size]
        base = next((r for r in rows if r["model"] == BASELINE and "macs" in r), None)
        for r in rows:
            if "macs" not in r:
                lines.append(f"| {size}³ | {r['model']} | {r['error']} | | | | | | |")
                continue
            m = r["macs"]
            ratio = _ratio(m["total"], base["macs"]["total"] if base else None)
            lines.append(
                f"| {size}³ | {r['model']} | {r['params']:,} | {m['conv'] / 1e9:.1f} "
                f"| {(m['matmul'] + m['attention']) / 1e9:.2f} | {m['scan'] / 1e9:.3f} "
                f"| {m['total'] / 1e9:.1f} "
                f"| {2 * m['total'] / 1e9:.1f} | {ratio} |"
            )
    return "\n".join(lines)


def format_tables(result: dict) -> str:
    """One Markdown table per patch size, with ratios against the baseline model."""
    cfg = result["config"]
    m = result["machine"]
    where = m.get("gpu") or f"{m['processor']}, {cfg['threads']} threads"
    lines = [
        f"Device: {cfg['device']} ({where}); torch {result['versions']['torch']}, dtype {cfg['dtype']}"
        f"{' (autocast)' if cfg['autocast'] else ''}, batch {cfg['batch']}, scan backend "
        f"{cfg['scan_backend']}; medians of {cfg['rounds']} × {cfg['repeats']} timed calls after "
        f"{cfg['warmup']} warm-up call(s) per round (rounds interleaved across models); sliding window: "
        f"median of {cfg['sw_repeats']} timed volume(s) in the first round. MACs: forward, batch 1. "
        f"Ratios: against {BASELINE} in the same run."
        + ("" if cfg.get("complete") else " **Partial: the run stopped before all cells were measured.**"),
        "",
    ]
    sizes = cfg["sizes"]
    for size in sizes:
        rows = [r for r in result["rows"] if r["size"] == size]
        base = next((r for r in rows if r["model"] == BASELINE), None)
        bt = (base or {}).get("timing") or {}
        bmacs = base["macs"]["total"] if base and "macs" in base else None
        sw_vol = next(
            (r["timing"].get("sw_volume") for r in rows if r.get("timing", {}).get("sw_volume")), None
        )
        sw_note = "no sliding window"
        if sw_vol:
            sw_note = f"sliding window over a {'×'.join(map(str, sw_vol))} volume"
        lines.append(f"**Patch {size}³** ({sw_note})")
        lines.append("")
        lines.append(
            "| model | params (M) | GMACs | MACs ratio | train step (s) | train ratio "
            "| train ratio / MACs ratio | inference (s/patch) | inference ratio | peak train (MiB) "
            "| memory ratio | sliding window (s/volume) | sw ratio |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if "params" not in r:
                lines.append(f"| {r['model']} | {r['error']} |" + " |" * 11)
                continue
            macs = r["macs"]["total"]
            head = f"| {r['model']} | {r['params'] / 1e6:.2f} | {macs / 1e9:.1f} | {_ratio(macs, bmacs)} "
            t = r.get("timing")
            if not t:
                lines.append(head + "|" + " |" * 9)
                continue
            if "error" in t:
                lines.append(head + f"| {t['error']} |" + " |" * 8)
                continue
            tr = t["train_median_s"]
            trr = tr / bt["train_median_s"] if bt.get("train_median_s") else None
            per_mac = f"{trr / (macs / bmacs):.2f}" if trr and bmacs else "n/a"
            sw = t.get("sw_median_s")
            lines.append(
                head + f"| {tr:.3f} | {_ratio(tr, bt.get('train_median_s'))} | {per_mac} "
                f"| {t['infer_median_s']:.3f} | {_ratio(t['infer_median_s'], bt.get('infer_median_s'))} "
                f"| {t['train_peak_bytes'] / 2**20:.0f} "
                f"| {_ratio(t['train_peak_bytes'], bt.get('train_peak_bytes'))} "
                f"| {f'{sw:.2f}' if sw is not None else 'n/a'} | {_ratio(sw, bt.get('sw_median_s'))} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Train-step time and peak training memory against patch size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    keys = (("train_median_s", "train step (s)"), ("infer_median_s", "inference (s / patch)"),
            ("train_peak_bytes", "peak memory while training (MiB)"))  # fmt: skip
    for ax, (key, label) in zip(axes, keys, strict=True):
        for name in dict.fromkeys(r["model"] for r in result["rows"]):
            pts = [(r["size"], r["timing"][key]) for r in result["rows"]
                   if r["model"] == name and r.get("timing") and key in r["timing"]]  # fmt: skip
            if not pts:
                continue
            xs, ys = zip(*sorted(pts), strict=True)
            if key.endswith("bytes"):
                ys = [y / 2**20 for y in ys]
            style = "-" if name.startswith("mambaclinix") else "--"
            ax.plot(xs, ys, style, marker="o", label=name)
        ax.set_xlabel("patch edge (voxels, cubic patch)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.set_xticks(cfg["sizes"])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    where = result["machine"].get("gpu") or f"CPU, {cfg['threads']} threads"
    fig.suptitle(f"{where}, {cfg['dtype']}, batch {cfg['batch']}, torch {result['versions']['torch']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp32, or autocast to bf16/fp16")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="cubic patch edges")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--models", nargs="+", choices=MODELS, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all models")
    p.add_argument("--sw-repeats", type=int, default=1)
    p.add_argument(
        "--volume", type=int, nargs=3, default=None, help="sliding-window volume (default 1.5×patch)"
    )
    p.add_argument("--no-sw", action="store_true", help="skip the sliding-window timing")
    p.add_argument("--sw-sizes", type=int, nargs="+", default=None, help="sliding window at these sizes only")
    p.add_argument("--macs-only", action="store_true", help="parameters and MACs only (no timing)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--cpu-allocator", choices=("system", "caching"), default="system",
        help="CPU memory allocator of every model: PyTorch's (the tables of docs/benchmarks.md) or "
        "mambaclinix.ops.cpu_allocator's caching one, as the mambaclinix command trains",
    )  # fmt: skip
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune (slower first calls)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_allocator == "caching" and args.device == "cpu":
        from mambaclinix.ops.cpu_allocator import enable_cpu_caching_allocator

        enable_cpu_caching_allocator(strict=True)
    if args.child:
        try:
            out = measure(args.child, args.sizes[0], args)
        except Unavailable as e:
            out = {"error": str(e)}
        except MemoryError:
            out = {"error": "out of memory"}
        print(json.dumps(out))
        return

    def save(result, final=False):
        text = format_macs(result) if args.macs_only else format_tables(result)
        if args.json:
            _write(args.json, json.dumps(result, indent=1))
        if args.markdown:
            _write(args.markdown, text + "\n")
        if final:
            print(text)
            if args.plot and not args.macs_only:
                plot(result, args.plot)

    save(run(args, on_update=save), final=True)


if __name__ == "__main__":
    main()
