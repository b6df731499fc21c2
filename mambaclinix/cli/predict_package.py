"""``mambaclinix predict -i IN -o OUT -m MODEL``: segment images with a model package
(``docs/deploy.md``), without the training data, config or cache.

Inputs are a folder or image files (NIfTI, NRRD, MHA): nnU-Net channel naming (``CASE_0000.nii.gz``,
``CASE_0001.nii.gz``, ...) or, for single-channel models, one file per case. Each case's label map is
written atomically to ``OUT/CASE<ext>`` with the input's geometry. A case whose output exists is skipped
unless ``--overwrite`` (so an interrupted run resumes); a case that fails is reported and the others go
on; the exit code is 1 when any failed, with a summary of the failures.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PACKAGE_FLAGS", "predict_package_main", "wants_package_predict"]

PACKAGE_FLAGS = ("-i", "-o", "-m", "--input", "--output", "--package")
"""Options that make ``mambaclinix predict`` predict with a package instead of the LightningCLI."""


def wants_package_predict(argv: Sequence[str]) -> bool:
    """Whether ``mambaclinix predict ARGS`` (``argv`` without the subcommand) is the package form."""
    return any(a in PACKAGE_FLAGS or a.split("=", 1)[0] in PACKAGE_FLAGS[3:] for a in argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mambaclinix predict",
        description="Segment images with a model package written by `mambaclinix export`. (Without -i/-o/-m, "
        "`mambaclinix predict` is the LightningCLI's predict: -c CONFIG --ckpt_path CKPT.)",
    )
    p.add_argument("-i", "--input", nargs="+", required=True, type=Path, help="a folder or image file(s)")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for the label maps")
    p.add_argument("-m", "--package", required=True, type=Path, help="the model package (folder or zip)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirror test-time augmentation (default: as the model was trained to predict)",
    )
    p.add_argument("--folds", type=int, nargs="+", default=None, help="folds to ensemble (default: all)")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch", help="onnx: onnxruntime on CPU")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per network call")
    return p


def predict_package_main(argv: Sequence[str]) -> None:
    """Run ``mambaclinix predict -i IN -o OUT -m MODEL [...]`` (``argv`` without the subcommand)."""
    args = _parser().parse_args(list(argv))
    from mambaclinix.data.cases import DatasetError, find_images
    from mambaclinix.deploy.metadata import PackageError
    from mambaclinix.deploy.predictor import Predictor
    from mambaclinix.inference import output_extension, write_segmentation

    logging.basicConfig(level=logging.WARNING)
    try:
        predictor = Predictor(
            args.package,
            device=args.device,
            tta=args.tta,
            folds=args.folds,
            engine=args.engine,
            sw_batch_size=args.sw_batch_size,
        )
    except (PackageError, ValueError) as err:
        raise SystemExit(f"mambaclinix predict: {err}") from None
    source = args.input[0] if len(args.input) == 1 else args.input
    try:
        cases = find_images(source, predictor.num_channels, None)
    except DatasetError as err:
        raise SystemExit(f"mambaclinix predict: {err}") from None
    args.output.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, str]] = []
    done = skipped = 0
    for n, case in enumerate(cases, 1):
        out = args.output / f"{case.name}{output_extension(case.image_paths[0])}"
        prefix = f"[{n}/{len(cases)}] {case.name}"
        if out.exists() and not args.overwrite:
            skipped += 1
            print(f"{prefix}: {out} exists, skipped (--overwrite to predict again)", file=sys.stderr)
            continue
        start = time.perf_counter()
        try:
            labels, _ = predictor.predict_case(case)
            write_segmentation(labels, case.image_paths[0], out)
        except Exception as err:  # one bad case must not stop the others
            failures.append((case.name, f"{type(err).__name__}: {err}"))
            print(f"{prefix}: FAILED ({err})", file=sys.stderr)
            continue
        done += 1
        print(f"{prefix}: {out} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    print(
        f"{done} case(s) predicted, {skipped} skipped, {len(failures)} failed; label maps in {args.output}",
        file=sys.stderr,
    )
    if failures:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in failures)
        raise SystemExit(f"mambaclinix predict: {len(failures)} case(s) failed:\n{lines}")
