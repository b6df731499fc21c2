"""``torch.compile`` against eager mode: train step and inference of a MambaClinix preset, same process.

The train step is that of ``bench_models.py`` (``zero_grad``, forward, cross-entropy on random labels,
backward, Adam step); inference is a forward under ``torch.inference_mode`` in ``eval()``. The compiled
and the eager variant share the weights; after the compilation (timed once, it includes the warm-up
call), each round times one call of every variant in turn, so noise from other processes reaches both
alike. Reported: medians over rounds, the compiled/eager ratio per round and its spread, and the largest
difference between the compiled and the eager logits (same weights, same input).

    python benchmarks/bench_compile.py --model mambaclinix_paper --size 64 --batch 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median, sync  # noqa: E402

from mambaclinix.models import create_model  # noqa: E402


def _logits(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mambaclinix_tiny")
    p.add_argument("--size", type=int, default=32, help="cubic patch edge")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--mode", default=None, help="torch.compile mode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (GPU recipes)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--cpu-allocator", choices=("caching", "system"), default="caching",
        help="caching: mambaclinix.ops.cpu_allocator, as the mambaclinix command trains; system: PyTorch's",
    )  # fmt: skip
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cpu_allocator == "caching" and device.type == "cpu":
        from mambaclinix.ops.cpu_allocator import enable_cpu_caching_allocator

        enable_cpu_caching_allocator(strict=True)
    torch.manual_seed(0)
    model = create_model(args.model, deep_supervision=False).to(device)
    x = torch.randn(args.batch, model.in_channels, *(args.size,) * 3, device=device)
    y = torch.randint(0, model.out_channels, (args.batch, *(args.size,) * 3), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-5, weight_decay=1e-5)
    compiled = torch.compile(model, backend=args.backend, mode=args.mode)

    def train(net):
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(_logits(net(x)).float(), y)
        loss.backward()
        opt.step()

    def infer(net):
        model.eval()
        with torch.inference_mode(), autocast:
            return _logits(net(x)).float()

    def timed(fn, net):
        sync(device)
        t0 = time.perf_counter()
        out = fn(net)
        sync(device)
        return time.perf_counter() - t0, out

    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(device)}
    result["compile_s"] = {"train": timed(train, compiled)[0], "inference": timed(infer, compiled)[0]}
    times = {k: [] for k in ("train_eager", "train_compiled", "inference_eager", "inference_compiled")}
    for _ in range(args.rounds):
        for phase, fn in (("train", train), ("inference", infer)):
            for variant, net in (("eager", model), ("compiled", compiled)):
                times[f"{phase}_{variant}"].append(timed(fn, net)[0])
    result["times_s"] = times
    for phase in ("train", "inference"):
        ratios = [c / e for c, e in zip(times[f"{phase}_compiled"], times[f"{phase}_eager"], strict=True)]
        result[f"{phase}_ratio"] = {"median": median(ratios), "min": min(ratios), "max": max(ratios)}
    ref, out = infer(model), infer(compiled)
    result["max_abs_diff_logits"] = (out - ref).abs().max().item()
    result["max_abs_logit"] = ref.abs().max().item()
    for phase in ("train", "inference"):
        r = result[f"{phase}_ratio"]
        print(
            f"{phase}: eager {median(times[phase + '_eager']):.3f} s, compiled "
            f"{median(times[phase + '_compiled']):.3f} s, ratio {r['median']:.2f} "
            f"(rounds {r['min']:.2f}-{r['max']:.2f}); compile {result['compile_s'][phase]:.0f} s"
        )
    print(
        f"logits: max |compiled - eager| {result['max_abs_diff_logits']:.2e} of {result['max_abs_logit']:.2e}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
