"""Where a network's time goes, block by block, against where its multiply-accumulates are.

Each block (a submodule named below) is run on its own, on the very input it receives inside the whole
network (captured with forward hooks on one forward pass), for forward + backward of ``out.sum()``:
median of ``--repeats`` calls after one warm-up. Its MACs come from the same counter as the model tables
(``benchmarks/_flops.py``). A block whose share of the time is well above its share of the MACs is
spending time outside arithmetic (memory-bound element-wise work, layout copies, slow kernels).

    python benchmarks/profile_blocks.py --model mambaclinix --size 64 --batch 1
    python benchmarks/profile_blocks.py --model mambaclinix --size 64 --inner   # inside HGCN / Mamba
    python benchmarks/profile_blocks.py --model nnunet_plain --size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, time_call  # noqa: E402
from _flops import count_macs  # noqa: E402
from _zoo import MODELS, build_model  # noqa: E402

from mambaclinix.layers import HGCNBlock, MambaLayer  # noqa: E402

_INNER = {
    HGCNBlock: ("reduce", "norm1", "hgconv", "hgconv.proj_in", "hgconv.dwconv", "hgconv.proj_out", "norm2",
                "conv_a", "conv_b"),
    MambaLayer: ("norm", "mamba", "mamba.in_proj", "mamba.x_proj", "mamba.out_proj", "proj"),
}  # fmt: skip


_LISTS = (nn.ModuleList, nn.Sequential)


def block_names(model: nn.Module, inner: bool) -> list[str]:
    """The blocks to time: the U-Net's components (and, with ``inner``, the parts of HGCN/Mamba layers)."""
    names = []
    for name, mod in model.named_modules():
        depth = name.count(".")
        parent_is_list = (
            isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.ModuleList) if depth else False
        )
        top = depth == 0 and name and not isinstance(mod, nn.ModuleList)
        if (top or (depth == 1 and parent_is_list)) and not isinstance(mod, nn.Identity):
            names.append(name)
        if inner and type(mod) in _INNER and (depth == 1 and parent_is_list):
            names += [f"{name}.{sub}" for sub in _INNER[type(mod)]]
    if not any(
        "." in n for n in names
    ):  # dynamic-network-architectures: encoder.stem, encoder.stages.i, decoder.*
        names = [
            n for n, _ in model.named_modules()
            if n == "encoder.stem"
            or (n.count(".") == 2 and isinstance(model.get_submodule(n.rsplit(".", 1)[0]), _LISTS))
        ]  # fmt: skip
    return names


def use_reference_layers() -> None:
    """Switch off the CPU fast paths of the layer library (for a before/after comparison): the depthwise
    and 1×1×1 convs go back to ``nn.Conv3d`` and the channel LayerNorm to the mean/variance formula."""
    from mambaclinix.layers import hgconv
    from mambaclinix.layers.norm import LayerNormChannels

    def formula(self, x):
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(view) + self.bias.view(view) if self.weight is not None else x

    from mambaclinix.layers import blocks

    hgconv.depthwise_conv = hgconv.pointwise_conv = blocks.pointwise_conv = lambda x, conv: conv(x)
    LayerNormChannels.forward = formula


def _grad_leaves(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.is_floating_point())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_grad_leaves(o) for o in obj)
    return obj


def profile(model: nn.Module, x: torch.Tensor, names: list[str], repeats: int) -> list[dict]:
    from mambaclinix.layers import blocks, hgconv

    device = x.device
    inputs: dict[str, tuple] = {}
    calls: dict[str, object] = {}
    by_id = {id(model.get_submodule(n)): n for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.setdefault(n, tuple(t.detach() for t in a))) for n in names]  # fmt: skip
    # convs the layers call through a function (their fast paths), which no module hook sees
    targets = ((hgconv, "depthwise_conv"), (hgconv, "pointwise_conv"), (blocks, "pointwise_conv"))
    patched = [(mod, attr, getattr(mod, attr)) for mod, attr in targets]

    def recorder(fn):
        def wrapped(t, conv):
            n = by_id.get(id(conv))
            if n is not None and n not in inputs:
                inputs[n] = (t.detach(),)
                calls[n] = lambda u, conv=conv, fn=fn: fn(u, conv)
            return fn(t, conv)

        return wrapped

    for mod, attr, fn in patched:
        setattr(mod, attr, recorder(fn))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for mod, attr, fn in patched:
            setattr(mod, attr, fn)
    rows = []
    for n in names:
        mod = model.get_submodule(n)
        call = calls.get(n, mod)
        if n not in inputs:  # not called in this configuration (e.g. deep-supervision heads)
            continue
        args = _grad_leaves(inputs[n])
        if isinstance(mod, nn.LeakyReLU) or not any(a.requires_grad for a in args):
            continue

        def step(mod=mod, call=call, args=args):
            out = call(*[a.clone() if mod_inplace(mod) else a for a in args])
            out = out[0] if isinstance(out, (list, tuple)) else out
            out.sum().backward()

        times = time_call(step, device, repeats, warmup=1)
        for p in mod.parameters():
            p.grad = None
        macs = (
            count_macs(lambda mod=mod: _MetaCopy(mod), tuple(args[0].shape))["total"]
            if len(args) == 1
            else 0.0
        )
        rows.append({"block": n, "type": type(mod).__name__, "input": list(args[0].shape),
                     "fwdbwd_s": statistics.median(times), "macs": macs})  # fmt: skip
    return rows


def mod_inplace(mod: nn.Module) -> bool:
    return any(getattr(m, "inplace", False) for m in mod.modules())


def _MetaCopy(mod: nn.Module) -> nn.Module:  # noqa: N802
    """A meta-device copy of ``mod`` (count_macs builds under the meta device)."""
    import copy

    return copy.deepcopy(mod).to("meta")


def format_rows(rows: list[dict], total_s: float, total_macs: float, top_level: set[str]) -> str:
    lines = ["| block | type | input | fwd+bwd (ms) | time share | MACs share | time share / MACs share |",
             "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        ts = r["fwdbwd_s"] / total_s
        ms = r["macs"] / total_macs if total_macs else 0.0
        ratio = f"{ts / ms:.2f}" if ms > 1e-4 else "—"
        name = r["block"] if r["block"] in top_level else f"  ↳ {r['block']}"
        shape = "×".join(map(str, r["input"][1:]))
        lines.append(f"| {name} | {r['type']} | {shape} | {r['fwdbwd_s'] * 1e3:.1f} "
                     f"| {ts:.3f} | {ms:.3f} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="mambaclinix")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", action="store_true", help="also time the parts of HGCN and Mamba layers")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--reference-layers", action="store_true", help="switch off the CPU fast paths (before/after)"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.reference_layers:
        use_reference_layers()
    patch = (args.size,) * 3
    torch.manual_seed(0)
    model = build_model(args.model, patch).to(device)
    x = torch.randn(args.batch, 1, *patch, device=device)
    names = block_names(model, args.inner)
    rows = profile(model, x, names, args.repeats)
    done = {r["block"] for r in rows}
    top_names = {n for n in done if not any(n.startswith(o + ".") for o in done if o != n)}
    top = [r for r in rows if r["block"] in top_names]
    total_s = sum(r["fwdbwd_s"] for r in top)
    total_macs = sum(r["macs"] for r in top)
    info = machine_info(device)
    label = args.model + (" (reference layers)" if args.reference_layers else "")
    print(f"# {label}, input {args.batch}×1×{args.size}³, {info['processor']}, "
          f"{info['torch_threads']} threads, torch {info['torch']}; sum of blocks {total_s:.2f} s fwd+bwd, "
          f"{total_macs / 1e9:.1f} GMACs fwd")  # fmt: skip
    print(format_rows(rows, total_s, total_macs, top_names))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
