"""The LightningModule: training with deep supervision, sliding-window validation, test and prediction.

Paper defaults (Bian et al., arXiv:2409.12533, which trains with nnU-Net's recipe): Adam with coupled
weight decay 1e-5, lr 1e-4, eps 1e-5, poly schedule ``lr·(1 − progress)^0.9``; loss
``1·CE + 1·Dice + 0.8·L_TRS`` per output scale with nnU-Net's deep-supervision weights; whole-volume
evaluation by Gaussian-weighted sliding window (σ = patch/8, overlap 0.5), optional mirror test-time
augmentation. Gradient clipping (12) and mixed precision are Trainer settings (``gradient_clip_val``,
``precision``); the Mamba layers run in float32 regardless.

Axis order: the authors' arrays are SimpleITK's ``(z, y, x)``; this library's are TorchIO's ``(x, y, z)``.
``array_axes`` makes the Mamba layers scan and the L_TRS cells cover the same physical voxels as theirs
(``docs/architecture.md``, "Axis order").
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from mambaclinix.inference import ensemble_scores
from mambaclinix.layers import MambaLayer
from mambaclinix.losses import PAPER_GRID, PAPER_GRID_XYZ, DeepSupervisionLoss, DiceCETverskyLoss
from mambaclinix.metrics import PerClassDice, per_class_dice, per_class_hd95, per_class_nsd
from mambaclinix.models import create_model
from mambaclinix.utils.atomic import atomic_write

log = logging.getLogger(__name__)

#: ``array_axes`` → (Mamba scan order, L_TRS grid) that reproduce the authors' physical order: x fastest,
#: 14 cells along x.
ARRAY_AXES = {"xyz": ("F", PAPER_GRID_XYZ), "zyx": ("C", PAPER_GRID)}


class SegmentationModule(L.LightningModule):
    """Train, validate, test and predict a segmentation network on 3D patches / whole volumes.

    Args:
        net: a registered model name (built with ``in_channels``/``num_classes`` and ``net_kwargs``) or
            any ``nn.Module`` mapping ``(B, in_channels, *patch)`` to logits ``(B, num_classes, *patch)``
            (or a list of them, finest first, for deep supervision).
        net_kwargs: extra arguments of the registered model.
        in_channels: image channels (the CLI links it from the data module).
        num_classes: classes including background (linked from the data module).
        class_names: names of classes 1..K-1 for logs and tables (linked from the data module).
        patch_size: training patch and sliding-window size ``(D, H, W)`` (linked from the data module).
        loss_kwargs: arguments of :class:`~mambaclinix.losses.DiceCETverskyLoss` (``lambda_ce``,
            ``lambda_dice``, ``lambda_trs``, ``num_regions``, ...). ``{"lambda_trs": 0}`` is the authors'
            default trainer (CE + Dice); the default is their L_TRS variant (CE + Dice + 0.8·L_TRS).
        array_axes: the order of the physical axes in the arrays: ``"xyz"`` (TorchIO, this library's data
            pipeline) or ``"zyx"`` (SimpleITK/nnU-Net arrays). It sets the token order of every
            :class:`~mambaclinix.layers.MambaLayer` in the network (``"F"`` for ``"xyz"``, ``"C"`` for
            ``"zyx"``: x fastest either way, as the authors' layers scan) and the default L_TRS grid
            (:data:`~mambaclinix.losses.PAPER_GRID_XYZ` = 14×8×8 or :data:`~mambaclinix.losses.PAPER_GRID`
            = 8×8×14: 14 cells along x either way). An explicit ``net_kwargs["mamba_scan_order"]`` or
            ``loss_kwargs["num_regions"]``/``["patch_size"]`` takes precedence. A checkpoint saved before
            this option existed keeps the order it was trained with (last array axis fastest).
        batch_dice: "batch Dice" for the soft Dice and L_TRS terms (statistics summed over the batch).
            ``mambaclinix plan`` decides it as nnU-Net does (on when the patch covers less than a quarter
            of the median image, where nnU-Net adds a 3d_lowres configuration) and writes it into its
            config.
        deep_supervision_weights: per-output weights, finest first; ``None`` for nnU-Net's.
        lr: Adam learning rate.
        weight_decay: Adam's coupled L2 weight decay (as the paper's nnU-Net trainer).
        adam_eps: Adam's epsilon.
        poly_power: exponent of the poly schedule ``lr·(1 − step/total)^power``.
        poly_interval: ``"step"``: the schedule runs over the Trainer's total optimizer steps
            (``max_epochs`` × batches, or ``max_steps``) and changes every step; ``"epoch"``: it runs over
            ``max_epochs`` and changes once per epoch, ``lr·(1 − epoch/max_epochs)^power``, as nnU-Net's
            trainer steps it (the named recipes use this).
        sw_batch_size: windows per network call in the sliding window of validation, test and predict.
        sw_overlap: overlap of neighbouring windows, a fraction of the window size.
        mirror_tta: average the predictions over mirrored inputs (test-time augmentation).
        channels_last: feed the network ``channels_last_3d`` tensors (faster 3D convolutions on CPU).
        output_dir: where ``test`` writes ``test_metrics.csv``/``test_slices.png`` and ``predict`` writes
            label maps (into ``predictions/`` under it); default: the logger's directory.
        nsd_tolerance_mm: tolerance τ of the normalised surface Dice reported by ``test``.
    """

    def __init__(
        self,
        net: str | nn.Module = "mambaclinix_small",
        net_kwargs: dict[str, Any] | None = None,
        in_channels: int = 1,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        patch_size: Sequence[int] = (64, 64, 64),
        loss_kwargs: dict[str, Any] | None = None,
        array_axes: str = "xyz",
        batch_dice: bool = False,
        deep_supervision_weights: Sequence[float] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        adam_eps: float = 1e-5,
        poly_power: float = 0.9,
        poly_interval: str = "step",
        sw_batch_size: int = 2,
        sw_overlap: float = 0.5,
        mirror_tta: bool = False,
        channels_last: bool = True,
        output_dir: str | None = None,
        nsd_tolerance_mm: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        if len(tuple(patch_size)) != 3 or any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch_size must be three positive ints (D, H, W), got {patch_size}")
        names = list(class_names) if class_names is not None else [f"class{i}" for i in range(1, num_classes)]
        if len(names) == num_classes:  # background included: drop it
            names = names[1:]
        if len(names) != num_classes - 1:
            raise ValueError(f"class_names must name the {num_classes - 1} foreground classes, got {names}")
        if poly_interval not in ("step", "epoch"):
            raise ValueError(f"poly_interval must be 'step' or 'epoch', got {poly_interval!r}")
        if array_axes not in ARRAY_AXES:
            raise ValueError(
                f"array_axes must be 'xyz' (TorchIO arrays) or 'zyx' (SimpleITK), got {array_axes!r}"
            )
        self.save_hyperparameters(ignore=["net"] if isinstance(net, nn.Module) else None)
        scan_order, grid = ARRAY_AXES[array_axes]
        if isinstance(net, str):
            kwargs = {"mamba_scan_order": scan_order, **(net_kwargs or {})}
            net = create_model(net, in_channels=in_channels, out_channels=num_classes, **kwargs)
        else:
            set_scan_order(net, scan_order)
        self.net = net
        self.class_names = names
        self.patch_size = tuple(int(p) for p in patch_size)
        divisor = getattr(net, "size_divisor", None)
        if divisor is not None:
            div = divisor if isinstance(divisor, Sequence) else (divisor,) * 3
            if any(p % d for p, d in zip(self.patch_size, div, strict=True)):
                raise ValueError(
                    f"patch_size {self.patch_size} must be a multiple of the network's size divisor "
                    f"{tuple(div)}"
                )
        loss_kwargs = dict(loss_kwargs or {})
        if "num_regions" not in loss_kwargs and "patch_size" not in loss_kwargs:
            loss_kwargs["num_regions"] = grid
        if bool(loss_kwargs.setdefault("batch", batch_dice)) != bool(batch_dice):
            raise ValueError(
                f"batch_dice={batch_dice} contradicts loss_kwargs['batch']={loss_kwargs['batch']}; set one"
            )
        self.loss = DeepSupervisionLoss(DiceCETverskyLoss(**loss_kwargs), deep_supervision_weights)
        self.val_dice = PerClassDice(num_classes, average="none")
        self._predictions_dir: Path | None = None

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor):
        if self.hparams.channels_last and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Deep-supervision loss of a batch. A non-finite network output (NaN/inf in the batch or in the
        activations) is not passed to the loss (which would raise): a NaN loss wired to the graph is returned
        instead and ``nonfinite_reason`` says why, so that
        :class:`~mambaclinix.training.guards.NonFiniteGuard` skips the step on every rank."""
        x, y = batch["image"], batch["label"]
        out = self(x)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        self.nonfinite_reason: str | None = None
        total = torch.stack([o.detach().sum(dtype=torch.float32) for o in outs]).sum()
        if not bool(torch.isfinite(total)) and not all(bool(torch.isfinite(o).all()) for o in outs):
            where = "the input batch" if not bool(torch.isfinite(x).all()) else "the network output"
            cases = ", ".join(map(str, batch.get("name", [])))
            self.nonfinite_reason = f"non-finite values in {where} (cases {cases})"
            return sum(o.sum() for o in outs) * float("nan")
        loss = self.loss(outs, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        # An output with deep-supervision weight 0 (nnU-Net's coarsest) would leave its head without a
        # gradient, which DDP rejects ("parameters that were not used in producing the loss"); a zero term
        # keeps every output in the graph (its head gets a zero gradient).
        return loss + 0.0 * sum(o.float().mean() for o in outs)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                               eps=self.hparams.adam_eps)  # fmt: skip
        by_epoch = self.hparams.get("poly_interval", "step") == "epoch"
        if self._trainer is None:
            total = float("inf")
        elif by_epoch:
            total = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else float("inf")
        else:
            total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            return opt  # no known training length: constant learning rate
        power, total = self.hparams.poly_power, int(total)

        def poly(step: int) -> float:
            return max(0.0, 1.0 - step / total) ** power

        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly)
        interval = "epoch" if by_epoch else "step"
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained for another channel or class count, with a message saying so
        (instead of PyTorch's size-mismatch list), and one holding non-finite weights."""
        saved = dict(checkpoint.get("hyper_parameters") or {})
        if (
            saved
            and "array_axes" not in saved
            and "mamba_scan_order" not in (self.hparams.get("net_kwargs") or {})
        ):
            # saved before array_axes existed: its Mamba layers learned with the last array axis fastest
            log.warning(
                "checkpoint predates array_axes: its Mamba layers keep scanning the last array axis fastest"
            )
            set_scan_order(self.net, "C")
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        which = f"checkpoint {path}" if path else "the checkpoint"
        state, own = checkpoint.get("state_dict") or {}, self.state_dict()
        mismatched = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if mismatched:  # hyper-parameters overridden at load time: read the counts from the weights
            first = next(k for k, v in own.items() if v.ndim >= 3)  # the first convolution: (out, in, ...)
            if first in mismatched:
                saved["in_channels"] = state[first].shape[1]
        for key, what in (("in_channels", "input channel(s)"), ("num_classes", "classes")):
            if key in saved and key in self.hparams and int(saved[key]) != int(self.hparams[key]):
                raise ValueError(
                    f"{which} was trained with {saved[key]} {what} ({key}), but this model "
                    f"(and its data) has {self.hparams[key]}: use a checkpoint trained on data with "
                    f"{self.hparams[key]} {what}, or data matching the checkpoint"
                )
        if mismatched:
            pairs = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched[:3]]
            shapes = "; ".join(f"{k}: {a} vs {b}" for k, a, b in pairs)
            raise ValueError(
                f"{which} holds weights of another network configuration ({shapes}); "
                "build the model with the net and net_kwargs it was trained with"
            )
        floats = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
        bad = [k for k in floats if not bool(state[k].isfinite().all())]
        if bad:
            raise ValueError(
                f"{which} holds non-finite weights ({', '.join(bad[:3])}); use an earlier checkpoint"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what prediction needs (:mod:`mambaclinix.deploy.metadata`) for ``mambaclinix export``; a
        run that cannot be exported (a network given as an object) stores the reason instead."""
        from mambaclinix.deploy.checkpoint import checkpoint_metadata
        from mambaclinix.deploy.metadata import CHECKPOINT_KEY, PackageError

        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        try:
            checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(self, datamodule, trainer)
        except PackageError as err:
            checkpoint[CHECKPOINT_KEY] = {"error": str(err)}

    # ------------------------------------------------------------------ whole volumes
    def _first(self, out):
        return out[0] if isinstance(out, (list, tuple)) else out

    def predict_logits(self, image: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
        """Logits ``(B, K, *spatial)`` of whole volumes ``(B, C, *spatial)`` of any size.

        The Gaussian-weighted average of the windows' logits (and of their mirrored predictions with
        ``mirror_tta``), as nnU-Net v2 stitches; axes shorter than the patch are padded and cropped back.
        The argmax of the result is the segmentation, its softmax the probabilities (:meth:`predict_volume`).

        Raises:
            ValueError: ``C`` differs from the model's ``in_channels``, or the logits are not finite
                (NaN/inf in the image or the weights), which would otherwise argmax to background silently;
                the message names ``names``.
        """
        hp = self.hparams
        if image.ndim != 5 or image.shape[1] != hp.in_channels:
            which = f"case(s) {', '.join(map(str, names))}: " if names else ""
            raise ValueError(
                f"{which}image of shape {tuple(image.shape)} has {image.shape[1] if image.ndim > 1 else '?'} "
                f"channel(s); this model takes (B, {hp.in_channels}, D, H, W). Was it trained on another "
                "dataset (another channel count)?"
            )
        # The paper's (nnU-Net's) recipe, shared with the model package's Predictor.
        logits = ensemble_scores(
            image, [self], self.patch_size, hp.sw_batch_size, hp.sw_overlap,
            mirror_axes=(0, 1, 2) if hp.mirror_tta else None,
        )  # fmt: skip
        if not bool(torch.isfinite(logits.sum())):
            which = f"case(s) {', '.join(map(str, names))}" if names else "the volume"
            where = "the image" if not bool(torch.isfinite(image).all()) else "the network output"
            raise ValueError(
                f"{which}: the predicted logits are not finite (non-finite values in {where}); "
                "no prediction is written for it"
            )
        return logits

    def predict_volume(self, image: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
        """Softmax probabilities ``(B, K, *spatial)`` of whole volumes: the softmax of :meth:`predict_logits`
        (which raises ``ValueError`` on a wrong channel count or non-finite logits)."""
        return torch.softmax(self.predict_logits(image, names), dim=1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if _is_padding(batch):
            return
        pred = self.predict_logits(batch["image"], batch.get("name")).argmax(1, keepdim=True)
        self.val_dice.update(pred, batch["label"])

    def on_validation_epoch_end(self) -> None:
        # Dice over every rank's cases (torchmetrics sums the states across ranks in compute()); the count
        # is checked across ranks too, so that all ranks take the same branch.
        if int(self.all_gather(self.val_dice.count).sum()) == 0:
            return
        dice = self.val_dice.compute()
        self.val_dice.reset()
        # identical on every rank already: sync_dist only keeps Lightning's epoch-level bookkeeping uniform
        for name, d in zip(self.class_names, dice.reshape(-1).tolist(), strict=True):
            self.log(f"val/dice_{name}", d, sync_dist=True)
        self.log("val/dice_mean", dice.mean().float(), prog_bar=True, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._test_rows: list[dict] = []
        self._test_slices: list[tuple] = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Dice, HD95 and NSD per case and class. They are computed on the preprocessed grid (cropped,
        resampled to the target spacing) with that grid's spacing; to score in the original geometry,
        run ``predict`` and compare the written label maps."""
        if "label" not in batch:
            raise ValueError("test needs reference labels; use predict for images without labels")
        if _is_padding(batch):
            return
        pred = self.predict_logits(batch["image"], batch.get("name")).argmax(1, keepdim=True)
        label = batch["label"]
        K = self.hparams.num_classes
        metas = batch.get("meta") or [{}] * pred.shape[0]
        for i, name in enumerate(batch["name"]):
            spacing = metas[i].get("spacing", (1.0, 1.0, 1.0))
            p, t = pred[i : i + 1].cpu(), label[i : i + 1].cpu()
            row = {"case": name}
            scores = {
                "dice": per_class_dice(p, t, K)[0],
                "hd95": per_class_hd95(p, t, K, spacing=spacing)[0],
                f"nsd{self.hparams.nsd_tolerance_mm:g}mm": per_class_nsd(
                    p, t, K, tolerance=self.hparams.nsd_tolerance_mm, spacing=spacing
                )[0],
            }
            for metric, values in scores.items():
                for cname, v in zip(self.class_names, values.tolist(), strict=True):
                    row[f"{metric}_{cname}"] = v
            self._test_rows.append(row)
            if len(self._test_slices) < 3:
                z = int(t[0, 0].flatten(1).sum(1).argmax()) if t.any() else t.shape[2] // 2
                img = batch["image"][i, 0, z].float().cpu().numpy()
                self._test_slices.append((name, img, t[0, 0, z].numpy(), p[0, 0, z].numpy()))

    def on_test_epoch_end(self) -> None:
        # every rank's cases, each once (the loaders shard without repetition), in case order
        rows = sorted(_gather_objects(self._test_rows), key=lambda r: r["case"])
        slices = sorted(_gather_objects(self._test_slices), key=lambda s: s[0])[:3]
        out = self._output_dir()  # on every rank: the Trainer's log_dir is a collective call
        if not rows:
            return
        keys = [k for k in rows[0] if k != "case"]
        means = {k: float(sum(r[k] for r in rows) / len(rows)) for k in keys}
        for k, v in means.items():
            self.log(f"test/{k}", v, rank_zero_only=True)
        if self.trainer.is_global_zero:
            _write_csv_atomic(out / "test_metrics.csv", rows + [{"case": "mean", **means}])
            from mambaclinix.training.plots import plot_slices

            plot_slices(slices, out / "test_slices.png", self.class_names)
            log.info("test metrics written to %s", out / "test_metrics.csv")
        self.test_summary = {"cases": rows, "mean": means}

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        from mambaclinix.inference import labels_on_original_grid, output_extension, write_segmentation

        out_dir = self._predictions_dir or self._output_dir() / "predictions"
        if _is_padding(batch):
            return []
        # as nnU-Net exports: the logits are resampled to the original grid, then argmaxed
        logits = self.predict_logits(batch["image"], batch.get("name"))
        written = []
        for i, meta in enumerate(batch["meta"]):
            labels = labels_on_original_grid(logits[i].cpu(), meta)
            ref = Path(meta["image_paths"][0])
            path = out_dir / f"{batch['name'][i]}{output_extension(ref)}"
            write_segmentation(labels, ref, path)
            written.append(str(path))
        return written

    def on_predict_epoch_start(self) -> None:
        self._predictions_dir = self._output_dir() / "predictions"  # once, on every rank (collective)

    def on_predict_epoch_end(self) -> None:
        self._predictions_dir = None

    def _output_dir(self) -> Path:
        if self.hparams.output_dir is not None:
            path = Path(self.hparams.output_dir)
        else:
            log_dir = self.trainer.log_dir if self._trainer is not None else None
            path = Path(log_dir or ".")
        path.mkdir(parents=True, exist_ok=True)
        return path


def set_scan_order(net: nn.Module, scan_order: str) -> None:
    """Set the token order (``"C"`` or ``"F"``) of every :class:`~mambaclinix.layers.MambaLayer` in a
    network."""
    for module in net.modules():
        if isinstance(module, MambaLayer):
            module.scan_order = scan_order


def _is_padding(batch: dict) -> bool:
    """Whether ``batch`` only repeats cases another rank evaluates (distributed padding)."""
    flags = batch.get("duplicate")
    if flags is None:
        return False
    if any(flags) and not all(flags):
        raise ValueError("evaluation batches must not mix padding and real cases (use batch_size=1)")
    return bool(flags[0])


def _gather_objects(items: list) -> list:
    """All ranks' lists, concatenated (the list itself outside distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(items)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def _write_csv_atomic(path: Path, rows: list[dict]) -> None:
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
