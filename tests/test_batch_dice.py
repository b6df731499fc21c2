"""Batch Dice from the plan: the planner decides it with nnU-Net v2's rule and writes it into its config;
the training module's loss honours it."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_planning import write_dataset

from mambaclinix.planning import uses_batch_dice
from mambaclinix.training import SegmentationModule


def test_the_rule_by_hand():
    # nnU-Net adds 3d_lowres (and trains 3d_fullres with batch Dice) when the patch < 25% of the median image
    assert uses_batch_dice((48, 48, 48), (96, 96, 96))  # 1/8
    assert uses_batch_dice((128, 128, 128), (200, 512, 512))  # abdominal CT: 4%
    assert not uses_batch_dice((64, 64, 64), (96, 96, 96))  # 0.30
    assert not uses_batch_dice((48, 48, 24), (48, 48, 48))  # exactly 1/2
    assert not uses_batch_dice((48, 48, 12), (48, 48, 48))  # exactly 1/4: not below
    assert uses_batch_dice((48, 48, 11), (48, 48, 48))
    with pytest.raises(ValueError, match="must be positive"):
        uses_batch_dice((0, 4, 4), (8, 8, 8))


@pytest.mark.parametrize(
    ("budget", "patch", "expected"), [(0.4, [48, 48, 48], True), (1.0, [64, 64, 64], False)]
)
def test_the_planner_writes_batch_dice_into_its_config(tmp_path, budget, patch, expected):
    from mambaclinix.planning import plan_dataset, write_plan

    data = write_dataset(tmp_path / "Big", (96, 96, 96), (1.0, 1.0, 1.0), n=2)
    plan = plan_dataset(data, accelerator="cpu", memory_gb=budget, base_features=8, max_features=64,
                        validate=False)  # fmt: skip
    assert plan.patch_size == patch and plan.median_shape == [96, 96, 96]
    assert plan.batch_dice is expected
    plan_path, config_path = write_plan(plan, tmp_path / "out")
    assert yaml.safe_load(config_path.read_text())["model"]["batch_dice"] is expected
    assert yaml.safe_load(plan_path.read_text())["batch_dice"] is expected


@pytest.mark.parametrize("batch_dice", [False, True])
def test_the_loss_honours_batch_dice(batch_dice):
    module = SegmentationModule(
        "mambaclinix_tiny", num_classes=3, patch_size=(16, 16, 16), batch_dice=batch_dice,
        loss_kwargs={"lambda_ce": 0.0, "lambda_trs": 0.0},
    )  # fmt: skip
    assert module.loss.loss.dice.batch is batch_dice and module.loss.loss.trs.batch is batch_dice
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 4, 4), generator=g)
    labels[1] = 0  # the second sample has no foreground: per-sample and batch Dice differ a lot
    got = module.loss([logits], labels)
    # by hand: soft Dice of the foreground classes, -mean(Dice); batch Dice sums over the batch first
    p = torch.softmax(logits, 1)
    g1 = torch.stack([(labels == k) for k in range(3)], 1).double()
    dims = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    tp, ps, gs = (p * g1).sum(dims), p.sum(dims), g1.sum(dims)
    dice = (2 * tp + 1e-5) / (ps + gs + 1e-5)
    expected = -dice[..., 1:].mean()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_batch_dice_contradicting_loss_kwargs_is_refused():
    with pytest.raises(ValueError, match=r"batch_dice=True contradicts loss_kwargs\['batch'\]=False"):
        SegmentationModule("mambaclinix_tiny", patch_size=(16, 16, 16), batch_dice=True,
                           loss_kwargs={"batch": False})  # fmt: skip
