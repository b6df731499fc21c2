"""The LightningCLI behind ``mambaclinix fit|validate|test|predict`` and the demo.

:func:`lightning_cli` builds :class:`MambaClinixCLI`, Lightning's ``LightningCLI`` over
:class:`~mambaclinix.training.SegmentationModule` and ``mambaclinix.data.SegmentationDataModule``, with
the data module's channel count, class count, class names and patch size linked into the model, the run
folder and callbacks of ``PARSER_DEFAULTS``, atomic checkpoint writes and a
:class:`~mambaclinix.training.NonFiniteGuard` on every Trainer. The command line (``mambaclinix.cli``)
and the demo (``mambaclinix.demo``) both build their Trainer here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from mambaclinix.training.checkpoint import AtomicCheckpointIO
from mambaclinix.training.guards import NonFiniteGuard
from mambaclinix.training.module import SegmentationModule

TRAINER_DEFAULTS = {
    "gradient_clip_val": 12.0,
}

# Set on the parser (not as trainer_defaults objects) so that a config file can replace them. Both loggers
# write into one fixed run folder (``runs/mambaclinix``; no version_N), so checkpoints land in
# ``runs/mambaclinix/checkpoints`` and ``--ckpt_path last`` finds them from any later command. ``last.ckpt``
# is written at every validation and every 100 optimizer steps (``last_every_n_train_steps``), atomically;
# ``metrics.csv`` is appended to by every command (Lightning's CSVLogger would delete it).
PARSER_DEFAULTS = {
    "trainer.logger": [
        {"class_path": "mambaclinix.training.AppendingCSVLogger",
         "init_args": {"save_dir": "runs", "name": "mambaclinix", "version": ""}},
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": "runs", "name": "mambaclinix", "version": ""}},
    ],
    "trainer.callbacks": [
        {"class_path": "mambaclinix.training.ResumableCheckpoint",
         "init_args": {"save_last": True, "monitor": "val/dice_mean", "mode": "max",
                       "filename": "best-{epoch}", "last_every_n_train_steps": 100}},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
        {"class_path": "mambaclinix.training.TrainingCurves"},
    ],
}  # fmt: skip


class MambaClinixCLI(LightningCLI):
    """LightningCLI with the data module's shapes linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(PARSER_DEFAULTS)
        parser.link_arguments("data.num_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.patch_size", "model.patch_size", apply_on="parse")

    def _parse_ckpt_path(self) -> None:
        """Fill the model's arguments from ``--ckpt_path``'s hyperparameters, as Lightning does, but keep
        every model argument the user set (config file or command line): Lightning's own version lets
        the checkpoint overwrite them, so ``predict --ckpt_path X --model.output_dir Y`` ignored ``Y``."""
        sub = self.config.get("subcommand")
        if not sub or not self.config[sub].get("ckpt_path"):
            return super()._parse_ckpt_path()
        given = self.config[sub].get("model")
        defaults = self.parser._subcommands_action._name_parser_map[sub].get_defaults().get("model")
        explicit = {}
        if given is not None and defaults is not None:
            given, defaults = given.as_dict(), defaults.as_dict()
            explicit = {k: v for k, v in given.items() if k not in defaults or v != defaults[k]}
        super()._parse_ckpt_path()
        for key, value in explicit.items():
            self.config[sub]["model"][key] = value

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with :class:`~mambaclinix.training.AtomicCheckpointIO` unless ``trainer.plugins``
        names another ``CheckpointIO``: a crash while saving never truncates a checkpoint."""
        from lightning.fabric.plugins import CheckpointIO

        plugins = kwargs.get("plugins", self._get(self.config_init, "trainer", default={}).get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        # NaN/inf safety on by default, also when a config replaces the callback list
        if not any(isinstance(cb, NonFiniteGuard) for cb in trainer.callbacks):
            trainer.callbacks.append(NonFiniteGuard())
        return trainer


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> MambaClinixCLI:
    """Build (and with ``run`` execute) the LightningCLI on ``args`` (``sys.argv[1:]`` if None).

    The resolved configuration is saved into the run folder as ``config_<subcommand>.yaml``.
    """
    from mambaclinix.data import SegmentationDataModule  # TorchIO: imported when a CLI is built

    first = (list(args) if args is not None else sys.argv[1:2]) or [""]
    sub = first[0] if run and first[0] in SUBCOMMANDS else "run"
    return MambaClinixCLI(
        SegmentationModule,
        SegmentationDataModule,
        args=None if args is None else list(args),
        run=run,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True, "config_filename": f"config_{sub}.yaml"},
        seed_everything_default=0,
    )
