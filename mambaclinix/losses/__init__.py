"""Segmentation losses of MambaClinix (paper §2). Depends on torch only.

The contract (every loss in this package)
=========================================

**Input.** ``input`` is a floating tensor ``(B, K, *spatial)`` — B samples, K class channels, 1 to 3
spatial dims (the paper uses 3: ``(B, K, D, H, W)``). The nnU-Net-style losses (:class:`SoftDiceLoss`,
:class:`CrossEntropyLoss`, :class:`RegionSpecificTverskyLoss`, :class:`DiceCETverskyLoss`) take *logits* and
apply the softmax inside, and need K >= 2. The MONAI-compatible losses (:class:`TverskyLoss`,
:class:`DiceCELoss`) keep MONAI's argument names *and defaults* (no activation, ``include_background=True``,
``to_onehot_y=False``) so they are drop-in replacements: pass ``softmax=True, to_onehot_y=True`` for logits
and label maps.

**Target.** The format is read from the shape, never from the dtype:

* ``(B, *spatial)`` or ``(B, 1, *spatial)``: integer class labels in ``[0, K)`` (any integer, bool or
  integral float dtype). Losses with ``ignore_index`` also accept that value; those voxels contribute
  nothing (CE skips them; Dice/Tversky/L_TRS zero prediction and target there).
* ``(B, K, *spatial)``: one-hot (or soft) target with values in ``[0, 1]``.
* K = 1 (sigmoid-style binary losses): ``(B, *spatial)`` / ``(B, 1, *spatial)`` is the binary mask.

The MONAI-compatible losses additionally check ``to_onehot_y`` against the format (labels need
``to_onehot_y=True``, one-hot needs ``False``), as MONAI does.

**Background** is channel 0 / label 0. ``include_background=False`` (the default of the nnU-Net-style
losses) drops channel 0 from Dice, Tversky and L_TRS *after* the softmax over all K channels; the cross
entropy always uses every class.

**Items and reduction.** Dice-type losses first compute one value per item: per (sample, class), shape
``(B, C)``, or per class ``(C,)`` with ``batch=True`` (statistics summed over the batch first, "batch Dice");
C = K or K − 1 without background. ``reduction="mean"`` averages the items, ``"sum"`` adds them, ``"none"``
returns them. For the cross entropy the items are voxels (``"none"`` gives ``(B, *spatial)``; ``"mean"``
divides by the summed class weights of non-ignored voxels and is 0 when all are ignored). The compound
losses offer ``"mean"`` and ``"sum"`` (applied to each term, then weighted).

**Sign conventions.** :class:`SoftDiceLoss` (default ``convention="nnunet"``) returns ``−Dice`` ∈ [−1, 0];
``convention="monai"`` returns ``1 − Dice`` ∈ [0, 1]. :class:`RegionSpecificTverskyLoss` returns
``L_TRS = −mean(TI)`` ∈ [−1, 0] like the paper. :class:`TverskyLoss` and :class:`DiceCELoss` follow MONAI
(``1 − TI``, ``1 − Dice``). Conventions differ by a constant only; gradients are identical. The paper loss
:class:`DiceCETverskyLoss` = ``1·CE + 1·(−Dice) + 0.8·(−TI)`` therefore lies in ``[−1.8, ∞)``.

**Dtype.** Losses compute in fp32 whatever the input dtype: fp16/bf16 inputs are upcast and autocast is
switched off inside; fp64 inputs stay fp64 (the tests use it). The result is fp32 (fp64 for fp64 input).

**Errors.** Every bad argument raises ``ValueError`` in ``__init__``; every bad call raises ``ValueError``
before any compute, naming the argument and the expected vs. received shapes: wrong ``input``/``target``
shapes, label values ``>= K`` or ``< 0`` (other than ``ignore_index``), non-integral labels, one-hot values
outside ``[0, 1]``, and NaN or inf in the logits. (These checks synchronise with the device once per call.)

**Deep supervision.** :class:`DeepSupervisionLoss` wraps any of the above for a list of logits, finest
first, with nnU-Net's weights (∝ 2^−i, coarsest 0, sum 1) and order-0 resized targets (the label
nearest each coarse voxel's centre, as nnU-Net's ``DownsampleSegForDSTransform2``).
"""

from mambaclinix.losses.compound import DiceCETverskyLoss, MambaClinixLoss
from mambaclinix.losses.cross_entropy import CrossEntropyLoss
from mambaclinix.losses.deep_supervision import (
    DeepSupervisionLoss,
    deep_supervision_weights,
    downsample_labels,
)
from mambaclinix.losses.dice import DiceCELoss, SoftDiceLoss, soft_dice
from mambaclinix.losses.region_tversky import (
    PAPER_GRID,
    PAPER_GRID_XYZ,
    RegionSpecificTverskyLoss,
    grid_from_patch_size,
    region_tversky_index,
)
from mambaclinix.losses.tversky import TverskyLoss, tversky_index

__all__ = [
    "PAPER_GRID",
    "PAPER_GRID_XYZ",
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "DiceCELoss",
    "DiceCETverskyLoss",
    "MambaClinixLoss",
    "RegionSpecificTverskyLoss",
    "SoftDiceLoss",
    "TverskyLoss",
    "deep_supervision_weights",
    "downsample_labels",
    "grid_from_patch_size",
    "region_tversky_index",
    "soft_dice",
    "tversky_index",
]
