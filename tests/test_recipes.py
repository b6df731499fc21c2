"""The named recipes in ``examples/configs``: parsed and instantiated by the LightningCLI (no training),
checked against the authors' trainer: the loss, 1000 epochs × exactly 250 iterations, the optimiser and
schedule, the inference settings, the physical axis order, and batch Dice from the plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _synthetic import make_dataset
from test_planning import write_dataset

from mambaclinix.layers import MambaLayer

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
LOSSES = {"paper_gpu.yaml": (1.0, 1.0, 0.8), "paper_gpu_ce_dice.yaml": (1.0, 1.0, 0.0)}


def _cli(args):
    from mambaclinix.cli import lightning_cli

    # accelerator=cpu: the GPU recipes must parse on this machine too
    return lightning_cli([*args, "--trainer.logger=false", "--trainer.accelerator=cpu"], run=False)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_recipe_numbers(tmp_path, name):
    data = make_dataset(tmp_path / "data", n=2)
    cli = _cli(["-c", str(CONFIGS / name), f"--data.data_dir={data}"])
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    loss = model.loss.loss
    assert (loss.lambda_ce, loss.lambda_dice, loss.lambda_trs) == LOSSES[name]
    assert loss.dice.include_background is False and loss.dice.convention == "nnunet"
    assert loss.trs.num_regions == (14, 8, 8)  # the authors' 8×8×14 (z, y, x) on TorchIO's (x, y, z)
    assert {m.scan_order for m in model.net.modules() if isinstance(m, MambaLayer)} == {"F"}  # x fastest
    assert loss.dice.batch is False and loss.trs.batch is False  # without a plan
    # 1000 epochs × exactly 250 iterations of 2 patches
    assert trainer.max_epochs == 1000
    assert dm.hparams.iterations_per_epoch == 250 and dm.hparams.batch_size == 2
    assert trainer.limit_train_batches == 1.0  # the epoch length comes from the data module alone
    assert dm.hparams.oversampling == "batch" and dm.hparams.augment is True
    # preprocessing: 3rd-order images, one-hot linear labels
    assert (dm.hparams.image_interpolation, dm.hparams.label_interpolation) == ("bspline", "onehot_linear")
    # optimiser, schedule, clipping
    hp = model.hparams
    assert (hp.lr, hp.weight_decay, hp.adam_eps, hp.poly_power) == (1e-4, 1e-5, 1e-5, 0.9)
    assert trainer.gradient_clip_val == 12.0
    # Adam with coupled weight decay; poly schedule stepped per epoch: lr·(1 − epoch/1000)^0.9 by hand
    assert hp.poly_interval == "epoch"
    model.trainer = trainer
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert type(opt) is torch.optim.Adam and sched["interval"] == "epoch"
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["eps"]) == (1e-5, 1e-5)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        sched["scheduler"].step()
    assert lrs == pytest.approx([1e-4 * (1 - e / 1000) ** 0.9 for e in range(3)], rel=1e-12)
    assert sched["scheduler"].lr_lambdas[0](999) == pytest.approx((1 / 1000) ** 0.9, rel=1e-12)
    # inference: 50% overlap, mirror TTA; nnU-Net's deep-supervision weights
    assert hp.sw_overlap == 0.5 and hp.mirror_tta is True and model.loss.weights is None
    assert tuple(hp.patch_size) == (128, 128, 128) and hp.net == "mambaclinix_paper"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_recipe_then_plan_takes_batch_dice_from_the_plan(tmp_path, name):
    from mambaclinix.planning import plan_dataset, write_plan

    data = write_dataset(tmp_path / "Big", (96, 96, 96), (1.0, 1.0, 1.0), n=2)
    plan = plan_dataset(data, accelerator="gpu", memory_gb=2.0, validate=False)
    assert plan.batch_dice is True  # the patch sees less than a quarter of the median image
    _, config = write_plan(plan, tmp_path / "plan")
    cli = _cli(["-c", str(CONFIGS / name), "-c", str(config)])
    loss = cli.model.loss.loss
    assert cli.model.hparams.batch_dice is True and loss.dice.batch is True and loss.trs.batch is True
    assert (loss.lambda_ce, loss.lambda_dice, loss.lambda_trs) == LOSSES[name]  # the recipe's loss stays
    assert list(cli.model.hparams.patch_size) == plan.patch_size  # the plan's patch and network
    assert cli.model.hparams.net_kwargs == yaml.safe_load(config.read_text())["model"]["net_kwargs"]
    assert cli.trainer.max_epochs == 1000 and cli.datamodule.hparams.iterations_per_epoch == 250
    assert cli.model.hparams.mirror_tta is True  # the recipe's inference settings stay


def test_bad_poly_interval_is_refused():
    from mambaclinix.training import SegmentationModule

    with pytest.raises(ValueError, match=r"poly_interval must be 'step' or 'epoch', got 'batch'"):
        SegmentationModule("mambaclinix_tiny", patch_size=(16, 16, 16), poly_interval="batch")
