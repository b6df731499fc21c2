"""The ``mambaclinix`` command.

``mambaclinix COMMAND [ARGS]``; ``mambaclinix --help`` lists the commands. Each command lives in its own
module of this package and is imported only when it runs, so ``mambaclinix --help`` and the help of the
light commands start without importing Lightning or TorchIO:

* ``fit``, ``validate``, ``test``, ``predict`` (:mod:`mambaclinix.cli.lightning`): Lightning's
  ``LightningCLI`` (:func:`mambaclinix.training.lightning_cli`) over
  :class:`~mambaclinix.training.SegmentationModule` and :class:`~mambaclinix.data.SegmentationDataModule`;
* ``plan`` (:mod:`mambaclinix.cli.plan`): fingerprint a dataset, write its plan and a ready config;
* ``demo-data`` and ``demo`` (:mod:`mambaclinix.cli.demo`): the embedded brain-MRI demo.

The LightningCLI's names (``lightning_cli``, ``MambaClinixCLI``, ``PARSER_DEFAULTS``, ...) stay importable
from here; they are loaded on first access.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from mambaclinix.utils.lazy import lazy_attributes


class Command(NamedTuple):
    """A command: the module and function that run it (``function(argv)``) and its one-line summary."""

    module: str
    function: str
    summary: str


_LIGHTNING = "mambaclinix.cli.lightning"

COMMANDS: dict[str, Command] = {
    "fit": Command(_LIGHTNING, "lightning_main", "train a network (LightningCLI)"),
    "validate": Command(_LIGHTNING, "lightning_main", "score a checkpoint on the validation cases"),
    "test": Command(_LIGHTNING, "lightning_main", "score a checkpoint on the test cases"),
    "predict": Command(_LIGHTNING, "lightning_main", "write label maps for new images"),
    "plan": Command("mambaclinix.cli.plan", "plan_main", "plan spacing, patch, batch and network"),
    "demo-data": Command("mambaclinix.cli.demo", "demo_data_main", "build the demo brain-MRI dataset"),
    "demo": Command("mambaclinix.cli.demo", "demo_main", "train and test on the demo, beside k-means"),
}

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

_LAZY = {
    "PARSER_DEFAULTS": "mambaclinix.training.lightning_cli",
    "SUBCOMMANDS": "mambaclinix.training.lightning_cli",
    "TRAINER_DEFAULTS": "mambaclinix.training.lightning_cli",
    "MambaClinixCLI": "mambaclinix.training.lightning_cli",
    "lightning_cli": "mambaclinix.training.lightning_cli",
    "demo_data_main": "mambaclinix.cli.demo",
    "demo_main": "mambaclinix.cli.demo",
    "plan_main": "mambaclinix.cli.plan",
}


__all__ = ["COMMANDS", "Command", "main", "usage", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


def usage() -> str:
    """The top-level help: every command with its one-line summary."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: mambaclinix COMMAND [ARGS]  (mambaclinix COMMAND --help for its options)",
        "",
        "MambaClinix: hierarchical gated convolution and Mamba U-Net for 3D medical image segmentation.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``mambaclinix ARGS`` (``argv``, default ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    name = args[0]
    if name not in COMMANDS:
        if name.startswith("-"):  # LightningCLI's own top-level options (e.g. --print_config)
            from mambaclinix.cli.lightning import lightning_main

            return lightning_main(args)
        print(usage(), file=sys.stderr)
        raise SystemExit(f"mambaclinix: unknown command {name!r}")
    command = COMMANDS[name]
    function = getattr(importlib.import_module(command.module), command.function)
    if name in _LIGHTNING_COMMANDS:
        return function(args)
    return function(args[1:])
