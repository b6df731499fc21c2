"""``mambaclinix export RUN_DIR_OR_CKPT [...] OUT``: write a model package (``docs/deploy.md``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def export_main(argv: Sequence[str]) -> None:
    """``mambaclinix export``: checkpoints (or run folders) → a model package folder or zip."""
    p = argparse.ArgumentParser(
        prog="mambaclinix export",
        description="Write a model package: the network's weights as safetensors and model.json "
        "(preprocessing plan, classes, sliding-window settings, model card). Predict with it: "
        "mambaclinix predict -i IN -o OUT -m PACKAGE. Several checkpoints (folds) make an ensemble.",
    )
    p.add_argument(
        "sources",
        nargs="+",
        type=Path,
        help="checkpoint files or run folders (their checkpoints/last.ckpt), one per fold",
    )
    p.add_argument("out", type=Path, help="the package folder (or zip file with --zip)")
    p.add_argument("--zip", action="store_true", help="write one zip file instead of a folder")
    p.add_argument("--onnx", action="store_true", help="also export each fold's network as ONNX")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=None,
        help="a fold number for each source (default: the fold each was trained on, else 0, 1, ...)",
    )
    args = p.parse_args(list(argv))
    from mambaclinix.deploy.metadata import PackageError
    from mambaclinix.deploy.package import export_package, read_package

    try:
        out = export_package(
            args.sources, args.out, as_zip=args.zip, onnx=args.onnx, folds=args.folds, opset=args.opset
        )
    except PackageError as err:
        raise SystemExit(f"mambaclinix export: {err}") from None
    package = read_package(out)
    size = (
        sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    )
    folds = ", ".join(map(str, package.folds))
    print(f"model package written to {out} (fold(s) {folds}; {size / 2**20:.1f} MiB)", file=sys.stderr)
