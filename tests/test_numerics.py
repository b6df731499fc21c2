"""Numerical safety: mixed precision with the Mamba layers in fp32, the NaN guard, determinism.

On CPU, bf16 mixed precision runs 20 steps of ``mambaclinix_tiny`` (the block types of every preset: HGCN
and Mamba stages, deep supervision) on 16×8×8 patches: CPUs without bf16 instructions emulate bf16
convolutions, and 50 steps of ``mambaclinix_small`` took 1-2 s each on a 2-core machine. The 50-step
``mambaclinix_small`` runs in bf16 and fp16 are the ``cuda`` tests.
"""

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import mambaclinix.layers.mamba as mamba_module
from mambaclinix.layers.mamba import Mamba, MambaLayer
from mambaclinix.training import NonFiniteGuard, NonFiniteTrainingError, SegmentationModule


class _Losses(L.Callback):
    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def _trainer(steps: int, callbacks, precision="32-true", accelerator="cpu", **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator=accelerator, precision=precision, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     callbacks=callbacks, num_sanity_val_steps=0, **kwargs)  # fmt: skip


def _datamodule(root, cache, **kwargs):
    from mambaclinix.data import SegmentationDataModule  # TorchIO: imported here, the GPU tests need none

    defaults = dict(
        patch_size=(16, 16, 16), num_workers=0, val_fraction=0, samples_per_volume=2, batch_size=2
    )
    return SegmentationDataModule(data_dir=str(root), cache_dir=str(cache), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from _synthetic import make_dataset

    root = tmp_path_factory.mktemp("numerics")
    return make_dataset(root / "data", n=3), root / "cache"


# ------------------------------------------------------------------------------------ mixed precision


def _mixed_precision_run(data, monkeypatch, net, patch, steps, precision, accelerator="cpu"):
    """Train ``steps`` steps; record the dtypes met by the convolutions, the Mamba modules and the scan."""
    L.seed_everything(0)
    model = SegmentationModule(net=net, patch_size=patch, num_classes=3, lr=1e-3)
    seen: dict[str, set] = {k: set() for k in ("mamba_in", "mamba_out", "layer_out", "scan", "conv")}
    hooks = []
    for module in model.modules():
        if isinstance(module, Mamba):
            hooks.append(module.register_forward_pre_hook(lambda m, a: seen["mamba_in"].add(a[0].dtype)))
            hooks.append(module.register_forward_hook(lambda m, a, out: seen["mamba_out"].add(out.dtype)))
        elif isinstance(module, MambaLayer):
            hooks.append(
                module.register_forward_hook(lambda m, a, out: seen["layer_out"].add((a[0].dtype, out.dtype)))
            )
        elif isinstance(module, nn.Conv3d):
            hooks.append(module.register_forward_hook(lambda m, a, out: seen["conv"].add(out.dtype)))
    assert any(isinstance(m, Mamba) for m in model.modules())
    scan = mamba_module.selective_scan

    def recording_scan(u, delta, A, B, C, *args, **kwargs):
        seen["scan"].update(t.dtype for t in (u, delta, A, B, C))
        return scan(u, delta, A, B, C, *args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", recording_scan)
    losses, guard = _Losses(), NonFiniteGuard(patience=1)
    trainer = _trainer(steps, [losses, guard], precision=precision, accelerator=accelerator, devices=1)
    if isinstance(data, DataLoader):
        trainer.fit(model, data)
    else:
        trainer.fit(model, datamodule=data)
    for h in hooks:
        h.remove()
    return model, seen, torch.stack(losses.losses).float().cpu(), guard


def test_bf16_mixed_on_cpu_gives_finite_losses_with_mamba_in_fp32(synthetic, monkeypatch):
    # 20 steps of the tiny preset on 16x8x8 patches: bf16 convolutions are emulated on CPUs without
    # bf16 instructions (1-2 s per step of mambaclinix_small here); the 50-step run of mambaclinix_small
    # in bf16 and fp16 is test_mixed_precision_on_gpu.
    root, cache = synthetic
    dm = _datamodule(root, cache, patch_size=(16, 8, 8), batch_size=1, samples_per_volume=4, augment=False)
    model, seen, losses, guard = _mixed_precision_run(
        dm, monkeypatch, "mambaclinix_tiny", (16, 8, 8), 20, "bf16-mixed"
    )
    assert losses.shape == (20,) and torch.isfinite(losses).all(), losses
    assert guard.skipped_steps == []
    assert seen["conv"] == {torch.bfloat16}  # autocast is active around the network ...
    assert seen["mamba_in"] == seen["mamba_out"] == seen["scan"] == {torch.float32}  # ... not in Mamba
    assert all(i == o for i, o in seen["layer_out"])  # the layer hands back its input's dtype
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_on_gpu(monkeypatch, precision):
    # patches of smooth random volumes whose labels are two intensity levels (a task the net can learn)
    loader = DataLoader(_Smooth(100, (32, 32, 32)), batch_size=2, collate_fn=_collate)
    model, seen, losses, guard = _mixed_precision_run(
        loader, monkeypatch, "mambaclinix_small", (32, 32, 32), 50, precision, accelerator="gpu"
    )
    half = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    assert losses.shape == (50,) and torch.isfinite(losses).all(), losses
    assert guard.skipped_steps == []  # fp16 overflow steps are the gradient scaler's, not counted
    assert losses[-10:].mean() < losses[:10].mean()  # it trains
    assert seen["conv"] == {half} and all(i == o for i, o in seen["layer_out"])
    assert seen["mamba_in"] == seen["mamba_out"] == seen["scan"] == {torch.float32}
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------ NaN guard


class _Volumes(torch.utils.data.Dataset):
    """Random 8³ batches; the indices in ``nan_at`` carry a NaN voxel in the image."""

    def __init__(self, n: int, nan_at=()):
        self.n, self.nan_at = n, set(nan_at)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = torch.randn(1, 8, 8, 8, generator=g)
        if i in self.nan_at:
            image[0, 1, 2, 3] = float("nan")
        return {"image": image, "label": torch.randint(0, 3, (1, 8, 8, 8), generator=g), "name": f"vol{i}"}


class _Smooth(torch.utils.data.Dataset):
    """Smoothed noise volumes ``(1, *shape)``, z-scored; label 1 above 0.5, 2 above 1.5."""

    def __init__(self, n: int, shape):
        self.n, self.shape = n, tuple(shape)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        noise = torch.randn(1, 1, *self.shape, generator=torch.Generator().manual_seed(i))
        image = F.avg_pool3d(noise, 5, stride=1, padding=2)[0]
        image = (image - image.mean()) / image.std()
        label = (image > 0.5).long() + (image > 1.5).long()
        return {"image": image, "label": label, "name": f"smooth{i}"}


def _collate(items):
    stack = {k: torch.stack([x[k] for x in items]) for k in ("image", "label")}
    return {**stack, "name": [x["name"] for x in items]}


class _Snapshots(L.Callback):
    """Weights before every optimizer step (``before``) and after the last one (``final``)."""

    def __init__(self):
        self.before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(nn.utils.parameters_to_vector(pl_module.parameters()).detach().clone())

    def on_train_end(self, trainer, pl_module):
        self.final = nn.utils.parameters_to_vector(pl_module.parameters()).detach().clone()


def _small_module() -> SegmentationModule:
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(4, 3, 1))
    return SegmentationModule(net=net, patch_size=(8, 8, 8), num_classes=3, lr=1e-2, channels_last=False)


def test_a_nan_batch_skips_its_step_and_training_goes_on(caplog):
    model, snaps, guard = _small_module(), _Snapshots(), NonFiniteGuard(patience=3)
    loader = DataLoader(_Volumes(6, nan_at=[2]), batch_size=1, collate_fn=_collate)
    with caplog.at_level(logging.WARNING, logger="mambaclinix.training.guards"):
        trainer = _trainer(6, [snaps, guard])
        trainer.fit(model, loader)
    assert guard.skipped_steps == [2] and guard.stop_reason is None
    assert trainer.global_step == 6
    steps = [*snaps.before[1:], snaps.final]
    for i, (before, after) in enumerate(zip(snaps.before, steps, strict=True)):
        assert torch.equal(before, after) == (i == 2), i  # only the NaN batch left the weights unchanged
    assert torch.isfinite(snaps.final).all()
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "step 2" in message and "non-finite values in the input batch (cases vol2)" in message


def test_k_bad_steps_in_a_row_stop_the_run_with_finite_weights_and_checkpoint(tmp_path, caplog):
    model, snaps, guard = _small_module(), _Snapshots(), NonFiniteGuard(patience=3)
    loader = DataLoader(_Volumes(8, nan_at=range(2, 8)), batch_size=1, collate_fn=_collate)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(tmp_path, save_last=True)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[snaps, guard, checkpoint])  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="mambaclinix.training.guards"):
        with pytest.raises(
            NonFiniteTrainingError, match=r"training stopped at step 4: 3 optimizer steps in a row"
        ):
            trainer.fit(model, loader)
    assert guard.skipped_steps == [2, 3, 4]
    assert len(snaps.before) == 5  # steps 0..4 ran, 5..7 never started
    assert torch.equal(snaps.final, snaps.before[2])  # the weights after the last finite step (1)
    assert "last finite step (1)" in guard.stop_reason
    assert any("training stopped" in r.getMessage() for r in caplog.records)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    torch.testing.assert_close(nn.utils.parameters_to_vector(state.values()), snaps.final, rtol=0, atol=0)


def test_a_nan_loss_from_finite_logits_is_caught_through_the_gradients(monkeypatch, caplog):
    model, snaps, guard = _small_module(), _Snapshots(), NonFiniteGuard(patience=0)  # never stop
    real = model.loss.forward
    calls = []

    def sometimes_nan(outputs, target):
        calls.append(1)
        loss = real(outputs, target)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    monkeypatch.setattr(model.loss, "forward", sometimes_nan)
    loader = DataLoader(_Volumes(5), batch_size=1, collate_fn=_collate)
    with caplog.at_level(logging.WARNING, logger="mambaclinix.training.guards"):
        _trainer(5, [snaps, guard]).fit(model, loader)
    assert guard.skipped_steps == [1, 2] and guard.stop_reason is None
    assert torch.equal(snaps.before[1], snaps.before[3]) and not torch.equal(snaps.before[3], snaps.final)
    assert sum("non-finite loss or gradients" in r.getMessage() for r in caplog.records) == 2


def test_a_checkpoint_with_nan_weights_is_not_written(tmp_path):
    model = _small_module()
    loader = DataLoader(_Volumes(2), batch_size=1, collate_fn=_collate)
    trainer = _trainer(2, [NonFiniteGuard()])
    trainer.fit(model, loader)
    good = tmp_path / "model.ckpt"
    trainer.save_checkpoint(good)
    saved = good.read_bytes()
    with torch.no_grad():
        model.net[0].weight[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteTrainingError, match=r"refusing to write a checkpoint.*net\.0\.weight"):
        trainer.save_checkpoint(good)
    assert good.read_bytes() == saved


def test_guard_arguments_are_checked():
    with pytest.raises(ValueError, match="patience must be an int >= 0"):
        NonFiniteGuard(patience=-1)


def test_the_cli_installs_the_guard_unless_configured(tmp_path):
    from _synthetic import make_dataset

    from mambaclinix.cli import lightning_cli

    data = make_dataset(tmp_path / "data", n=2)
    base = [f"--data.data_dir={data}", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.callbacks=[]", "--model.net=mambaclinix_tiny"]  # fmt: skip
    guards = [c for c in lightning_cli(base, run=False).trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert len(guards) == 1 and guards[0].patience == 5
    custom = [*base[:-2], "--trainer.callbacks+=mambaclinix.training.NonFiniteGuard",
              "--trainer.callbacks.patience=9", base[-1]]  # fmt: skip
    guards = [c for c in lightning_cli(custom, run=False).trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert [g.patience for g in guards] == [9]


# ---------------------------------------------------------------------------------------- determinism


def test_two_seeded_runs_give_identical_losses(synthetic):
    root, cache = synthetic
    runs = []
    for _ in range(2):
        L.seed_everything(123)
        model = SegmentationModule(net="mambaclinix_tiny", patch_size=(16, 16, 16), num_classes=3, lr=1e-3)
        losses = _Losses()
        _trainer(3, [losses]).fit(model, datamodule=_datamodule(root, cache, seed=7))
        runs.append(torch.stack(losses.losses))
    assert runs[0].shape == (3,)
    assert torch.equal(runs[0], runs[1]), runs  # bitwise
