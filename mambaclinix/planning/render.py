"""Rendering a dataset plan: ``plan.yaml`` (the decisions and the fingerprint summary) and ``config.yaml``
(a commented LightningCLI config for ``mambaclinix fit -c``); see ``docs/planning.md``.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from mambaclinix.planning.plan import DatasetPlan
from mambaclinix.utils.atomic import write_text_atomic

__all__ = ["config_text", "plan_text", "write_plan"]


def _flow(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _section(name: str, items: list[tuple[str, Any, str]], indent: int = 2) -> list[str]:
    lines = [f"{name}:"]
    pad = " " * indent
    for key, value, comment in items:
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:" + (f"  # {comment}" if comment else ""))
            for k, v in value.items():
                lines.append(f"{pad}  {k}: {_flow(v)}")
            continue
        text = f"{pad}{key}: {_flow(value)}"
        lines.append(text + (f"  # {comment}" if comment else ""))
    return lines


def config_text(plan: DatasetPlan, plan_path: str | Path | None = None) -> str:
    """The LightningCLI YAML (``mambaclinix fit -c``) of a plan, commented."""
    from mambaclinix import __version__
    from mambaclinix.data.normalization import resolve_normalization

    mem, tr, net = plan.memory, plan.training, plan.network
    src_key, src = next(iter(plan.source.items()))
    k = [tuple(v) for v in net["kernel_sizes"]]
    aniso = sum(1 for v in k if 1 in v)
    header = [
        f"# MambaClinix training configuration for '{plan.dataset['name']}', planned by `mambaclinix plan`",
        f"# (mambaclinix {__version__}, {datetime.date.today().isoformat()})."
        + (f" Plan and fingerprint: {plan_path}" if plan_path else ""),
        "#   mambaclinix fit -c THIS_FILE",
        "# Every value can be overridden on the command line, e.g. --data.batch_size=1",
        "# --trainer.max_epochs=50, or --model.net_kwargs='{n_stages: 5, ...}' (replaces the whole dict).",
        f"# Memory: predicted peak {mem['predicted_peak_gib']} GiB of {mem['usable_gib']} GiB usable "
        f"({mem['budget_gib']} GiB {mem['accelerator']} budget, {mem['precision']}).",
        "",
        "seed_everything: 0",
    ]
    trainer = _section(
        "trainer",
        [
            ("accelerator", mem["accelerator"], ""),
            ("devices", 1, "several GPUs: --trainer.devices=N --trainer.strategy=ddp"),
            ("precision", mem["precision"], "the memory model was fitted for this precision"),
            ("max_epochs", tr["max_epochs"], ""),
            ("check_val_every_n_epoch", tr["check_val_every_n_epoch"], ""),
            ("gradient_clip_val", 12.0, "nnU-Net"),
        ],
    )
    model = _section(
        "model",
        [
            ("net", "mambaclinix_paper", "registry preset; net_kwargs replace its topology"),
            (
                "net_kwargs",
                {
                    "n_stages": net["n_stages"],
                    "features_per_stage": net["features_per_stage"],
                    "kernel_sizes": net["kernel_sizes"],
                    "strides": net["strides"],
                    "n_hgcn_stages": net["n_hgcn_stages"],
                },
                f"{net['n_stages']} stages, HGCN at s < {net['n_hgcn_stages']}, Mamba after; "
                f"{aniso} stage(s) with a size-1 kernel axis; {net['parameters']:,} parameters",
            ),
            (
                "batch_dice",
                plan.batch_dice,
                "nnU-Net: on when the patch holds < 25% of the median image (it would add a 3d_lowres)",
            ),
            ("lr", 1e-4 if mem["accelerator"] == "gpu" else 1e-3, ""),
            ("channels_last", tr["channels_last"], ""),
        ],
    )
    auto = list(resolve_normalization("auto", plan.dataset["channel_names"]))
    norm = "auto" if plan.normalization == auto else plan.normalization[0]  # one scheme for all channels
    data = _section(
        "data",
        [
            (src_key, src, ""),
            ("patch_size", plan.patch_size, f"a multiple of the size divisor {net['size_divisor']}"),
            ("batch_size", plan.batch_size, f"predicted peak {mem['predicted_peak_gib']} GiB"),
            ("target_spacing", [round(v, 6) for v in plan.target_spacing],
             "mm per array axis" + ("" if plan.anisotropic_axis is None
                                    else f"; axis {plan.anisotropic_axis} anisotropic: 10th percentile")),
            ("normalization", norm, "per channel: " + ", ".join(plan.normalization)),
            ("foreground_probability", round(plan.foreground_probability, 6), "foreground oversampling"),
            ("iterations_per_epoch", tr["iterations_per_epoch"], ""),
            _loader_workers(mem["accelerator"]),
        ],
    )  # fmt: skip
    return "\n".join(header + trainer + model + data) + "\n"


def _loader_workers(accelerator: str) -> tuple[str, int, str]:
    """``data.num_workers``: on a GPU enough loader processes to keep up with it, on a CPU one (the training
    step needs the cores). One process augments about 3.5 patches/s at 128³ on a Xeon core and
    MambaClinix takes about 9.4/s on an H200 (bf16, batch 2; docs/benchmarks.md, "Training loader"), so
    a GPU gets up to 6, but never more than this machine's cores less one."""
    if accelerator != "gpu":
        return "num_workers", 1, "loader processes; the CPU's cores train"
    workers = max(1, min(6, (os.cpu_count() or 2) - 1))
    return "num_workers", workers, "loader processes; MambaClinix on an H200 at 128³ needs about 3"


def plan_text(plan: DatasetPlan) -> str:
    """The plan file: the decisions and the fingerprint summary, as commented YAML."""
    import yaml

    class Dumper(yaml.SafeDumper):
        """Lists of numbers or strings on one line, mappings as blocks."""

    def lists(dumper, value):
        flow = not any(isinstance(v, dict) for v in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    Dumper.add_representer(list, lists)
    body = yaml.dump(plan.to_dict(), Dumper=Dumper, sort_keys=False, default_flow_style=False, width=110)
    header = (
        "# Dataset plan written by `mambaclinix plan` (docs/planning.md explains every entry).\n"
        "# Axes are those of the arrays (TorchIO's order, as data.patch_size and data.target_spacing).\n"
        "# fingerprint: what was measured; target_spacing .. foreground_probability: what was decided;\n"
        "# memory: the budget and the memory model's prediction for patch_size x batch_size.\n"
    )
    return header + body


def write_plan(plan: DatasetPlan, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``plan.yaml`` and ``config.yaml`` (the LightningCLI config) into ``out_dir``, each atomically
    and durably (:func:`mambaclinix.utils.write_text_atomic`).

    Returns:
        ``(plan_path, config_path)``.
    """
    out = Path(out_dir)
    plan_path, config_path = out / "plan.yaml", out / "config.yaml"
    write_text_atomic(plan_path, plan_text(plan))
    write_text_atomic(config_path, config_text(plan, plan_path.resolve()))
    return plan_path, config_path
