"""The LightningCLI behind ``mambaclinix fit|validate|test|predict`` and the demo.

:func:`lightning_cli` builds :class:`MambaClinixCLI`, Lightning's ``LightningCLI`` over
:class:`~mambaclinix.training.SegmentationModule` and ``mambaclinix.data.SegmentationDataModule``, with
the data module's channel count, class count, class names and patch size linked into the model, the run
folder and callbacks of ``PARSER_DEFAULTS``, atomic checkpoint writes and a
:class:`~mambaclinix.training.NonFiniteGuard` on every Trainer. The command line (``mambaclinix.cli``)
and the demo (``mambaclinix.demo``) both build their Trainer here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from mambaclinix.training.checkpoint import AtomicCheckpointIO
from mambaclinix.training.cli_support import (
    ConfigurationError,
    MissingWeightsError,
    SetupCleanup,
    checkpoint_folder,
    find_last_checkpoint,
    quiet_lightning,
    replace_model_summary,
)
from mambaclinix.training.guards import NonFiniteGuard
from mambaclinix.training.module import SegmentationModule

log = logging.getLogger(__name__)

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


EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")

_LINKED = ("in_channels", "num_classes", "class_names", "patch_size")  # model arguments set from data
_UNTRAINED_HINT = "--allow_untrained runs it with randomly initialised weights (for testing a set-up only)"


class MambaClinixCLI(LightningCLI):
    """LightningCLI with the data module's shapes linked into the model, ``--ckpt_path last`` resolved
    before the model is built (so that it restores the network and data settings as a checkpoint path
    does), ``validate``/``test``/``predict`` refusing to run without trained weights unless
    ``--allow_untrained``, and no files left behind by a command that fails before its first batch."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(PARSER_DEFAULTS)
        parser.link_arguments("data.num_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.patch_size", "model.patch_size", apply_on="parse")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in EVALUATION_SUBCOMMANDS:
            parser.add_argument(
                "--allow_untrained",
                type=bool,
                default=False,
                help=f"{subcommand} without a checkpoint, with randomly initialised weights (default: "
                "refused; give --ckpt_path last or --ckpt_path FILE.ckpt)",
            )
        return parser

    def _explicit(self, sub: str, section: str) -> dict[str, Any]:
        """The arguments of ``section`` (``model``/``data``) the user set (config file or command line):
        those that differ from the parser's defaults."""
        given = self.config[sub].get(section)
        defaults = self.parser._subcommands_action._name_parser_map[sub].get_defaults().get(section)
        if given is None or defaults is None:
            return {}
        given, defaults = given.as_dict(), defaults.as_dict()
        return {k: v for k, v in given.items() if k not in defaults or v != defaults[k]}

    def _resolve_ckpt_path(self, sub: str) -> str | None:
        """``ckpt_path`` as a file (``last`` resolved), ``None`` for none; raises
        :class:`~mambaclinix.training.cli_support.MissingWeightsError` where weights are needed."""
        ckpt = self.config[sub].get("ckpt_path")
        allow = bool(self.config[sub].get("allow_untrained", False))
        evaluating = sub in EVALUATION_SUBCOMMANDS
        folder = checkpoint_folder(self.config[sub].get("trainer"))
        if ckpt in (None, "") and evaluating and not allow:
            last = find_last_checkpoint(folder)
            found = f"; {last} exists: --ckpt_path last uses it" if last is not None else ""
            raise MissingWeightsError(
                f"{sub} needs trained weights: give --ckpt_path last (the run's last.ckpt in {folder}) or "
                f"--ckpt_path FILE.ckpt{found}",
                hint=_UNTRAINED_HINT,
            )
        if ckpt == "last":
            last = find_last_checkpoint(folder)
            if last is not None:
                log.info("--ckpt_path last: %s", last)
                return str(last)
            if not evaluating:
                log.info(
                    "--ckpt_path last: no last.ckpt in %s yet; training starts from the beginning", folder
                )
                return None
            if not allow:
                raise MissingWeightsError(
                    f"{sub} --ckpt_path last: no last.ckpt in {folder}, so there are no trained weights to "
                    f"{sub} with",
                    hint="train first (mambaclinix fit with the same configuration: the folder comes from "
                    "trainer.logger or the checkpoint callback's dirpath), or give --ckpt_path FILE.ckpt; "
                    + _UNTRAINED_HINT,
                )
            ckpt = None
        elif ckpt == "best" and evaluating:
            best = sorted(str(p) for p in folder.glob("best*.ckpt")) if folder.is_dir() else []
            raise MissingWeightsError(
                f"{sub} --ckpt_path best: the best checkpoint is known only inside the fit that wrote it; "
                f"give its file: {', '.join(best) if best else f'none found in {folder}'}"
            )
        elif ckpt not in (None, "", "best", "hpc", "registry") and "://" not in str(ckpt):
            if not Path(ckpt).is_file():
                raise MissingWeightsError(f"--ckpt_path {ckpt}: checkpoint file not found")
        if ckpt in (None, "") and evaluating:
            log.warning("%s with untrained weights (--allow_untrained): the results are meaningless", sub)
        return ckpt

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` (see :meth:`_resolve_ckpt_path`) and fill the model's arguments from the
        checkpoint's hyperparameters, as Lightning does, and the data module's from the data module's saved
        hyperparameters, but keep every argument the user set (config file or command line): Lightning's
        own version lets the checkpoint overwrite them, so ``predict --ckpt_path X --model.output_dir Y``
        ignored ``Y``."""
        sub = self.config.get("subcommand")
        if not sub:
            return super()._parse_ckpt_path()
        self.config[sub]["ckpt_path"] = ckpt = self._resolve_ckpt_path(sub)
        if not ckpt or not Path(ckpt).is_file():
            return super()._parse_ckpt_path()
        explicit = {k: v for k, v in self._explicit(sub, "model").items() if k not in _LINKED}
        self._restore_data_settings(sub, ckpt)
        super()._parse_ckpt_path()
        for key, value in explicit.items():
            self.config[sub]["model"][key] = value
        self.config[sub]["model"]["patch_size"] = self.config[sub]["data"]["patch_size"]  # the link

    def _restore_data_settings(self, sub: str, ckpt: str) -> None:
        """The data module's saved arguments, except those the user set (``data_dir`` and ``manifest``
        count as one: giving either keeps both)."""
        import torch

        saved = torch.load(ckpt, weights_only=True, map_location="cpu").get("datamodule_hyper_parameters")
        data = self.config[sub].get("data")
        if not saved or data is None:
            return
        explicit = set(self._explicit(sub, "data"))
        if explicit & {"data_dir", "manifest"}:
            explicit |= {"data_dir", "manifest"}
        for key, value in dict(saved).items():
            if key in data and key not in explicit:
                data[key] = list(value) if isinstance(value, tuple) else value

    def instantiate_classes(self) -> None:
        """Build the classes; an argument a class refuses is a
        :class:`~mambaclinix.training.cli_support.ConfigurationError` naming the section."""
        from mambaclinix.data import DatasetError

        try:
            super().instantiate_classes()
        except DatasetError:
            raise
        except ValueError as err:
            raise ConfigurationError(f"invalid configuration: {err}") from err

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
        replace_model_summary(trainer)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the command; when it fails before its first batch, remove what it wrote in the run folder."""
        cleanup = SetupCleanup()
        cleanup.snapshot(lg.log_dir for lg in self.trainer.loggers if lg.log_dir is not None)
        self.trainer.callbacks.append(cleanup)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if not cleanup.started and self.trainer.is_global_zero:
                removed = cleanup.remove_new_files()
                if removed:
                    log.debug("removed what the failed %s wrote: %s", subcommand, removed)
            raise


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> MambaClinixCLI:
    """Build (and with ``run`` execute) the LightningCLI on ``args`` (``sys.argv[1:]`` if None).

    The resolved configuration is saved into the run folder as ``config_<subcommand>.yaml``.
    """
    from mambaclinix.data import SegmentationDataModule  # TorchIO: imported when a CLI is built

    quiet_lightning()
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
