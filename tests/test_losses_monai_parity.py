"""Parity of TverskyLoss and DiceCELoss with MONAI on random inputs (needs the ``dev`` extra's monai)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

monai_losses = pytest.importorskip("monai.losses")

from mambaclinix.losses import DiceCELoss, SoftDiceLoss, TverskyLoss  # noqa: E402

TOL = 1e-6


def _inputs(b=2, k=4, spatial=(5, 6, 7), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, *spatial, generator=g).to(dtype) * 3
    y = torch.randint(0, k, (b, 1, *spatial), generator=g).float()
    return x, y


TVERSKY_CONFIGS = [
    {"softmax": True, "to_onehot_y": True},
    {"softmax": True, "to_onehot_y": True, "include_background": False, "alpha": 0.3, "beta": 0.7},
    {"softmax": True, "to_onehot_y": True, "batch": True, "reduction": "sum"},
    {"softmax": True, "to_onehot_y": True, "reduction": "none", "smooth_nr": 0.0, "smooth_dr": 1e-6},
    {"sigmoid": True, "to_onehot_y": True, "alpha": 0.8, "beta": 0.2},
    {"other_act": torch.tanh, "to_onehot_y": True},
    {"softmax": True, "to_onehot_y": True, "ignore_index": 2},
]


@pytest.mark.parametrize("config", TVERSKY_CONFIGS)
def test_tversky_parity_with_monai(config):
    x, y = _inputs()
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ours = TverskyLoss(**config)(xa, y)
    ref = monai_losses.TverskyLoss(**config)(xb, y)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL)
    (ga,) = torch.autograd.grad(ours.sum(), xa)
    (gb,) = torch.autograd.grad(ref.sum(), xb)
    torch.testing.assert_close(ga, gb, rtol=0, atol=TOL)


def test_tversky_parity_one_hot_target_and_single_channel():
    x, y = _inputs(k=3)
    onehot = F.one_hot(y[:, 0].long(), 3).movedim(-1, 1).float()
    p = torch.softmax(x, 1)
    torch.testing.assert_close(
        TverskyLoss()(p, onehot), monai_losses.TverskyLoss()(p, onehot), rtol=0, atol=TOL
    )
    mask = (y > 0).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = TverskyLoss(sigmoid=True, include_background=False)(x[:, :1], mask)
        ref = monai_losses.TverskyLoss(sigmoid=True, include_background=False)(x[:, :1], mask)
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL)


DICECE_CONFIGS = [
    {"softmax": True, "to_onehot_y": True},
    {"softmax": True, "to_onehot_y": True, "include_background": False, "batch": True},
    {"softmax": True, "to_onehot_y": True, "reduction": "sum", "lambda_dice": 0.3, "lambda_ce": 1.7},
    {"to_onehot_y": True},  # MONAI default: no activation for the Dice term
    {"sigmoid": True, "to_onehot_y": True, "smooth_nr": 0.0, "smooth_dr": 1e-3},
]


@pytest.mark.parametrize("config", DICECE_CONFIGS)
def test_dice_ce_parity_with_monai(config):
    x, y = _inputs(seed=1)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ours = DiceCELoss(**config)(xa, y)
    ref = monai_losses.DiceCELoss(**config)(xb, y)
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL)
    (ga,) = torch.autograd.grad(ours, xa)
    (gb,) = torch.autograd.grad(ref, xb)
    torch.testing.assert_close(ga, gb, rtol=0, atol=TOL)


def test_dice_ce_parity_one_hot_and_binary():
    x, y = _inputs(k=3, seed=2)
    onehot = F.one_hot(y[:, 0].long(), 3).movedim(-1, 1).float()
    ours = DiceCELoss(softmax=True)(x, onehot)
    ref = monai_losses.DiceCELoss(softmax=True)(x, onehot)
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL)
    mask = (y > 0).float()
    ours = DiceCELoss(sigmoid=True)(x[:, :1], mask)
    ref = monai_losses.DiceCELoss(sigmoid=True)(x[:, :1], mask)
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL)


def test_nnunet_dice_convention_differs_from_monai_by_one():
    x, y = _inputs(seed=3)
    ref = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=False)(x, y)
    ours = SoftDiceLoss(include_background=False)(x, y)  # −Dice
    torch.testing.assert_close(ours + 1.0, ref, rtol=0, atol=TOL)
    ours_monai = DiceCELoss(softmax=True, to_onehot_y=True, lambda_ce=0.0, dice_convention="nnunet")(x, y)
    ref_monai = monai_losses.DiceLoss(softmax=True, to_onehot_y=True)(x, y)
    torch.testing.assert_close(ours_monai + 1.0, ref_monai, rtol=0, atol=TOL)
