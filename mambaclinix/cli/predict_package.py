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

__all__ = ["PACKAGE_FLAGS", "list_cases", "predict_package_main", "wants_package_predict"]

PACKAGE_FLAGS = ("-i", "-o", "-m", "--input", "--output", "--package")
"""Options that make ``mambaclinix predict`` predict with a package instead of the LightningCLI."""


def wants_package_predict(argv: Sequence[str]) -> bool:
    """Whether ``mambaclinix predict ARGS`` (``argv`` without the subcommand) is the package form."""
    return any(a in PACKAGE_FLAGS or a.split("=", 1)[0] in PACKAGE_FLAGS[3:] for a in argv)


def list_cases(inputs: Sequence[Path], num_channels: int) -> tuple[list, list[tuple[str, str]]]:
    """The cases of ``inputs`` (folders and/or files) for a model of ``num_channels`` channels, and the cases
    that cannot be predicted with the reason (a channel file missing or unexpected).

    Files named ``CASE_XXXX<ext>`` are the channels of ``CASE``; any other file is a case of its own (one
    channel, or every channel in one 4D file).

    Raises:
        mambaclinix.data.DatasetError: a missing input, an unsupported file type, no images at all.
    """
    from mambaclinix.data.cases import (
        CHANNEL_RE,
        INPUT_EXTENSIONS,
        Case,
        DatasetError,
        case_name,
        check_unique,
        split_extension,
        visible_files,
    )

    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += [p for p in visible_files(item) if split_extension(p) is not None]
        elif item.is_file():
            if split_extension(item) is None:
                raise DatasetError(f"{item}: unsupported file type; expected one of {INPUT_EXTENSIONS}")
            files.append(item)
        else:
            raise DatasetError(f"{item}: folder or image file to predict does not exist")
    if not files:
        raise DatasetError(
            f"{', '.join(map(str, inputs))}: no images with a supported extension {INPUT_EXTENSIONS}"
        )
    groups: dict[str, dict[int, Path]] = {}
    cases, failures = [], []
    for path in files:
        match = CHANNEL_RE.match(split_extension(path)[0])  # type: ignore[index]
        if match is None:
            cases.append(Case(case_name(path), (path,)))
        else:
            groups.setdefault(match["case"], {})[int(match["channel"])] = path
    for name, channels in groups.items():
        expected = list(range(num_channels))
        if sorted(channels) == expected:
            cases.append(Case(name, tuple(channels[c] for c in expected)))
            continue
        missing = [f"{name}_{c:04d}" for c in expected if c not in channels]
        extra = [channels[c].name for c in sorted(channels) if c not in expected]
        reason = f"missing channel file(s) {', '.join(missing)}" if missing else ""
        reason += ("; " if reason else "") + (
            f"unexpected channel file(s) {', '.join(extra)}" if extra else ""
        )
        failures.append((name, f"{reason} (the model takes {num_channels} channel(s))"))
    check_unique(cases, inputs[0])
    return sorted(cases, key=lambda c: c.name), failures


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
    from mambaclinix.data.cases import DatasetError
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
    try:
        cases, failures = list_cases(args.input, predictor.num_channels)
    except DatasetError as err:
        raise SystemExit(f"mambaclinix predict: {err}") from None
    for name, reason in failures:
        print(f"{name}: FAILED ({reason})", file=sys.stderr)
    args.output.mkdir(parents=True, exist_ok=True)
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
