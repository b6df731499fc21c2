"""Training patches per second per loader worker: per-patch augmentation against whole-volume augmentation.

Example (the figures of ``docs/benchmarks.md``)::

    python benchmarks/bench_loader.py --patch 48 128 --rounds 6 --json docs/loader_cpu.json

Both pipelines read the same synthetic preprocessed case from a cache-format folder (``image.npy``,
``label.npy``, ``meta.json``) in one process with one thread (torch, SimpleITK), which is what one
``DataLoader`` worker does:

* **per-patch** (today's :class:`~mambaclinix.data.patches.PatchStream`): each patch memory-maps the
  volume, cuts the enlarged crop its rotation/scaling needs, and gets nnU-Net's full augmentation on its
  own (:class:`~mambaclinix.data.patch_augmentation.PatchAugmentation`), batch-wise foreground
  oversampling;
* **per-patch, linear**: the same with ``PatchAugmentation(image_order=1)`` (trilinear instead of
  nnU-Net's cubic spline in the rotation/scaling), to show what the cubic interpolation costs;
* **whole-volume** (the earlier pipeline, rebuilt here from its parts for the comparison): each subject
  load reads the whole volume, augments it once with ``nnunet_augmentation()`` (TorchIO, linear
  interpolation) and cuts ``--samples-per-volume`` patches with ``ForegroundOversamplingSampler``, as the
  ``tio.Queue`` workers did.

The variants are interleaved: each round times one subject load of the whole-volume pipeline (its
``samples_per_volume`` patches) and then as many patches of each per-patch variant, so that load on the
machine hits all alike. Patches per second = patches / summed time over all rounds; ratios are against
the whole-volume pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402


def make_case(folder: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """A z-scored image with three blob classes, stored like a preprocessing cache entry."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid))
    label = np.zeros(shape, np.uint8)
    label[radius < 0.7] = 1
    label[radius < 0.45] = 2
    label[(np.abs(grid[0] - 0.3) < 0.05) & (radius < 0.6)] = 3
    image = label.astype(np.float32) + rng.normal(0, 0.5, size=shape).astype(np.float32)
    image = (image - image.mean()) / image.std()
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "image.npy", image[None])
    np.save(folder / "label.npy", label[None])
    (folder / "meta.json").write_text(json.dumps({"preprocessed_affine": np.eye(4).tolist()}))
    return folder


def _subject(folder: Path):
    import torchio as tio

    from mambaclinix.data.cache import read_cached_array

    return tio.Subject(
        image=tio.ScalarImage(folder / "image.npy", reader=read_cached_array),
        label=tio.LabelMap(folder / "label.npy", reader=read_cached_array),
        name="case",
        meta={},
    )


def bench(patch: int, volume: tuple[int, int, int], rounds: int, samples_per_volume: int, seed: int) -> dict:
    from mambaclinix.data.augmentation import nnunet_augmentation
    from mambaclinix.data.patch_augmentation import PatchAugmentation
    from mambaclinix.data.patches import PatchStream
    from mambaclinix.data.sampling import ForegroundOversamplingSampler

    size = (patch,) * 3
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_case(Path(tmp) / "case", volume, seed)
        streams = {
            name: PatchStream([_subject(folder)], patch_size=size, batch_size=2,
                              samples_per_volume=samples_per_volume, seed=seed, augmentation=augmentation)
            for name, augmentation in (("per-patch", PatchAugmentation()),
                                       ("per-patch, linear", PatchAugmentation(image_order=1)))
        }  # fmt: skip
        for stream in streams.values():
            stream[0]  # warm-up: memory map, foreground locations
        sampler = ForegroundOversamplingSampler(size, 1 / 3, seed=seed)
        transform = nnunet_augmentation()
        times = dict.fromkeys(["whole-volume", *streams], 0.0)
        count = dict.fromkeys(["whole-volume", *streams], 0)
        torch.manual_seed(seed)
        for r in range(rounds):
            start = time.perf_counter()
            subject = transform(_subject(folder))  # one subject load of a tio.Queue worker
            patches = list(sampler(subject, num_patches=samples_per_volume))
            assert patches[-1]["image"].data.shape[1:] == size
            times["whole-volume"] += time.perf_counter() - start
            count["whole-volume"] += samples_per_volume
            for name, stream in streams.items():  # the same patch indices: the same draws
                start = time.perf_counter()
                for i in range(samples_per_volume):
                    item = stream[1 + r * samples_per_volume + i]
                assert item["image"].shape[1:] == size
                times[name] += time.perf_counter() - start
                count[name] += samples_per_volume
    rate = {k: count[k] / times[k] for k in times}
    return {
        "patch": patch,
        "volume": list(volume),
        "patches": count,
        "seconds": times,
        "patches_per_s": rate,
        "ratio_vs_whole_volume": {k: rate[k] / rate["whole-volume"] for k in rate},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs="+", default=[48, 128])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per patch size")
    parser.add_argument("--samples-per-volume", type=int, default=8)
    parser.add_argument("--margin", type=float, default=1.5, help="volume edge = margin · patch edge")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:  # pragma: no cover - TorchIO depends on SimpleITK
        pass
    import scipy
    import torchio

    info = machine_info()
    info.update({"scipy": scipy.__version__, "torchio": torchio.__version__, "numpy": np.__version__})
    print("machine:", json.dumps(info))
    results = []
    for patch in args.patch:
        edge = int(round(patch * args.margin))
        volume = (edge, edge, int(round(edge * 0.85)))
        result = bench(patch, volume, args.rounds, args.samples_per_volume, args.seed)
        results.append(result)
        for name, rate in result["patches_per_s"].items():
            ratio = result["ratio_vs_whole_volume"][name]
            print(
                f"patch {patch}³ (volume {volume}), {name}: {rate:.2f} patches/s, {ratio:.2f}× whole-volume"
            )
    out = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
