"""One forward and one backward pass of a MambaClinix preset on CPU, with size, shapes, time and memory.

    python examples/forward_backward.py                       # paper preset, 1 -> 14 classes, 1x1x64^3
    python examples/forward_backward.py --size 32 32 64 --preset mambaclinix_small --batch 2

The input's spatial size must be a multiple of the model's ``size_divisor`` on every axis (32 for the
6-stage paper preset) and leave more than one voxel at the bottleneck.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from mambaclinix import create_model, list_models
from mambaclinix.ops import resolve_backend


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mambaclinix_paper", choices=list_models())
    parser.add_argument("--size", type=int, nargs="+", default=[64], help="D H W, or one size for all axes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = tuple(args.size) * 3 if len(args.size) == 1 else tuple(args.size)

    t0 = time.perf_counter()
    model = create_model(args.preset).train()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, model.in_channels, *size)

    t0 = time.perf_counter()
    out = model(x)
    fwd_s = time.perf_counter() - t0
    outputs = out if isinstance(out, list) else [out]
    # A stand-in loss: mean squared logit over every deep-supervision output.
    loss = sum(o.float().square().mean() for o in outputs)
    t0 = time.perf_counter()
    loss.backward()
    bwd_s = time.perf_counter() - t0
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]

    backend = resolve_backend(None, x.device)
    print(
        f"machine      : {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"scan backend : {backend!r}")
    print(f"model        : {args.preset}, {n_params:,} parameters, built in {build_s:.2f} s")
    print(f"input        : {tuple(x.shape)} float32")
    for t, o in enumerate(outputs):
        print(f"output[{t}]    : {tuple(o.shape)}")
    print(f"forward      : {fwd_s:.2f} s")
    print(f"backward     : {bwd_s:.2f} s")
    print(f"peak RSS     : {peak_rss_mib:,.0f} MiB")
    print(f"loss         : {loss.item():.4f}; parameters without a finite gradient: {len(missing)}")


if __name__ == "__main__":
    main()
