"""Numerical safety of training: skip steps with non-finite losses or gradients, stop cleanly when they
persist, and never write a checkpoint with non-finite weights (``docs/bad_input.md``).

How a bad step is handled. :class:`~mambaclinix.training.SegmentationModule` checks its network output
once per step (one reduction, like the loss's own check); when it is not finite (a NaN or inf in the
input batch, or weights/activations that overflowed) it does not call the loss, which would raise, but
returns a NaN loss wired to the graph, and records why in ``nonfinite_reason``. Backpropagating it makes
every gradient NaN, also on the other ranks of a distributed run (DDP averages the gradients), so every
rank skips the same step. :class:`NonFiniteGuard` then sees the non-finite gradients before the optimizer
step, drops them (``grad = None``: the optimizer leaves those weights and its own state untouched) and
logs a warning naming the step, the reason and a few of the affected parameters. A finite loss whose
gradients overflow is caught the same way. With fp16 mixed precision the gradient scaler already skips
overflowing steps and lowers its scale: those steps are left to it and not counted, unless the loss
itself was non-finite.

After ``patience`` consecutive skipped steps the guard asks the Trainer to stop (``trainer.should_stop``:
the epoch ends, checkpoints and loggers are written as usual, with the last finite weights) and, with
``raise_on_stop``, raises :class:`NonFiniteTrainingError` at the end of ``fit`` so that the process exits
with an error. Before any checkpoint is written it checks that every floating tensor of the state dict is
finite and otherwise raises, so a checkpoint on disk is never replaced by NaN weights.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)

__all__ = ["NonFiniteGuard", "NonFiniteTrainingError"]


class NonFiniteTrainingError(RuntimeError):
    """Training was stopped because losses or gradients stayed non-finite."""


def _finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor: every value finite. One reduction per tensor and a single device sync in the common
    case; the exact check runs only when a sum is not finite (it may overflow for huge finite values)."""
    if not tensors:
        return []
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])
    screen = torch.isfinite(sums).tolist()
    return [ok or bool(torch.isfinite(t).all()) for ok, t in zip(screen, tensors, strict=True)]


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps whose loss or gradients are not finite; stop after ``patience`` in a row.

    Installed by the ``mambaclinix`` CLI unless ``trainer.callbacks`` already lists one (list it there to
    change its settings).

    Args:
        patience: consecutive skipped steps after which training stops (``0``: never stop, only skip).
        raise_on_stop: after stopping, raise :class:`NonFiniteTrainingError` at the end of ``fit``
            (the checkpoints and logs are complete by then), so that scripts see a failed run.
        check_checkpoints: refuse to write a checkpoint whose weights are not finite.

    Attributes:
        skipped_steps: global steps whose optimizer step was skipped, in order.
        stop_reason: the message logged when training was stopped, else ``None``.
    """

    def __init__(self, patience: int = 5, raise_on_stop: bool = True, check_checkpoints: bool = True) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"NonFiniteGuard: patience must be an int >= 0, got {patience!r}")
        self.patience = patience
        self.raise_on_stop = raise_on_stop
        self.check_checkpoints = check_checkpoints
        self.skipped_steps: list[int] = []
        self.stop_reason: str | None = None
        self._consecutive = 0
        self._last_good_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.skipped_steps = []
        self.stop_reason = None
        self._consecutive = 0
        self._last_good_step = None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return
        ok = _finite([p.grad for _, p in named])
        reason = getattr(pl_module, "nonfinite_reason", None)
        step = trainer.global_step
        if all(ok):
            self._consecutive = 0
            self._last_good_step = step
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and reason is None:
            log.debug("step %d: fp16 gradient overflow; the gradient scaler skips this step", step)
            return
        bad = [n for (n, _), good in zip(named, ok, strict=True) if not good]
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_steps.append(step)
        self._consecutive += 1
        what = reason or "non-finite loss or gradients"
        log.warning(
            "step %d: %s: %d parameter gradient(s) are not finite (e.g. %s); the optimizer step is skipped "
            "and the weights are unchanged (%d skipped in a row%s)",
            step,
            what,
            len(bad),
            ", ".join(bad[:3]),
            self._consecutive,
            f", training stops at {self.patience}" if self.patience else "",
        )
        if self.patience and self._consecutive >= self.patience and self.stop_reason is None:
            last = "none" if self._last_good_step is None else str(self._last_good_step)
            self.stop_reason = (
                f"training stopped at step {step}: {self._consecutive} optimizer steps in a row had "
                f"non-finite losses or gradients (last: {what}). The weights are those after the last "
                f"finite step ({last}) and every checkpoint holds finite weights. Check the data "
                "(NaN/inf intensities), lower the learning rate, or train in bf16/fp32 instead of fp16."
            )
            log.error(self.stop_reason)
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not self.check_checkpoints:
            return
        state = checkpoint.get("state_dict", {})
        names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        ok = _finite([state[k] for k in names])
        bad = [k for k, good in zip(names, ok, strict=True) if not good]
        if bad:
            raise NonFiniteTrainingError(
                f"refusing to write a checkpoint at step {trainer.global_step}: {len(bad)} weight tensor(s) "
                f"are not finite (e.g. {', '.join(bad[:3])}); the checkpoints already on disk are kept"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stop_reason is not None and self.raise_on_stop:
            raise NonFiniteTrainingError(self.stop_reason)
