"""The ``mambaclinix`` command.

``mambaclinix COMMAND [ARGS]``; ``mambaclinix --help`` lists the commands. Each command lives in its own
module of this package and is imported only when it runs, so ``mambaclinix --help`` and the help of the
light commands start without importing Lightning or TorchIO:

* ``fit``, ``validate``, ``test``, ``predict`` (:mod:`mambaclinix.cli.lightning`): Lightning's
  ``LightningCLI`` (:func:`mambaclinix.training.lightning_cli`) over
  :class:`~mambaclinix.training.SegmentationModule` and :class:`~mambaclinix.data.SegmentationDataModule`;
* ``predict -i IN -o OUT -m MODEL`` (:mod:`mambaclinix.cli.predict_package`): predict with a model
  package; ``export`` (:mod:`mambaclinix.cli.export`): write one from checkpoints;
* ``plan`` (:mod:`mambaclinix.cli.plan`): fingerprint a dataset, write its plan and a ready config;
* ``demo-data`` and ``demo`` (:mod:`mambaclinix.cli.demo`): the embedded brain-MRI demo.

Errors a user can fix print one message and exit with status 1 (:mod:`mambaclinix.cli._errors`);
``--debug`` or ``MAMBACLINIX_DEBUG=1`` shows their traceback. :func:`run` is the ``mambaclinix``
command; :func:`main` runs the same commands but lets every exception through (for Python callers).

The commands that run networks first make :mod:`mambaclinix.ops.cpu_allocator`'s caching allocator
PyTorch's CPU allocator for the process (MambaClinix's CPU train step at a 96³ patch 1.87× faster, for
8-12 % more resident memory; docs/benchmarks.md). ``MAMBACLINIX_CPU_ALLOCATOR=system`` keeps PyTorch's own.
:func:`main` leaves the allocator of a Python caller's process alone.

The LightningCLI's names (``lightning_cli``, ``MambaClinixCLI``, ``PARSER_DEFAULTS``, ...) stay importable
from here; they are loaded on first access.
"""

from __future__ import annotations

import importlib
import os
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
    "predict": Command(
        _LIGHTNING, "lightning_main", "write label maps (-i IN -o OUT -m MODEL: from a package)"
    ),
    "export": Command("mambaclinix.cli.export", "export_main", "write a model package from checkpoints"),
    "plan": Command("mambaclinix.cli.plan", "plan_main", "plan spacing, patch, batch and network"),
    "demo-data": Command("mambaclinix.cli.demo", "demo_data_main", "build the demo brain-MRI dataset"),
    "demo": Command("mambaclinix.cli.demo", "demo_main", "train and test on the demo, beside k-means"),
}

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

#: Environment variable choosing the CPU allocator of the commands that run networks.
CPU_ALLOCATOR_ENV = "MAMBACLINIX_CPU_ALLOCATOR"
CPU_ALLOCATORS = ("caching", "system")
_NETWORK_COMMANDS = (*_LIGHTNING_COMMANDS, "demo", "export")

_LAZY = {
    "PARSER_DEFAULTS": "mambaclinix.training.lightning_cli",
    "SUBCOMMANDS": "mambaclinix.training.lightning_cli",
    "TRAINER_DEFAULTS": "mambaclinix.training.lightning_cli",
    "MambaClinixCLI": "mambaclinix.training.lightning_cli",
    "lightning_cli": "mambaclinix.training.lightning_cli",
    "demo_data_main": "mambaclinix.cli.demo",
    "demo_main": "mambaclinix.cli.demo",
    "plan_main": "mambaclinix.cli.plan",
    "export_main": "mambaclinix.cli.export",
    "predict_package_main": "mambaclinix.cli.predict_package",
}


__all__ = ["COMMANDS", "CPU_ALLOCATOR_ENV", "Command", "main", "run", "usage", "use_cpu_allocator", *_LAZY]


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
    lines += [
        "",
        "options:",
        "  --debug    show the traceback of an error (also: environment variable MAMBACLINIX_DEBUG=1)",
        "",
        f"environment: {CPU_ALLOCATOR_ENV}=system keeps PyTorch's CPU allocator (default: caching)",
    ]
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> None:
    """The ``mambaclinix`` command: :func:`main` on ``argv`` (default ``sys.argv[1:]``) where an error the
    user can fix prints one message and exits with status 1 (``--debug``: the traceback)."""
    from mambaclinix.cli._errors import run_command

    args = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in args if a in COMMANDS), None)

    def command(args: list[str]) -> None:
        if args and args[0] in _NETWORK_COMMANDS and not {"-h", "--help"} & set(args):
            use_cpu_allocator()
        main(args)

    run_command(command, args, prog="mambaclinix" if name is None else f"mambaclinix {name}")


def use_cpu_allocator() -> bool:
    """Enable the caching CPU allocator unless ``MAMBACLINIX_CPU_ALLOCATOR=system``; whether it is on.

    Raises:
        UserError: the variable holds something else than ``caching`` or ``system``.
    """
    choice = os.environ.get(CPU_ALLOCATOR_ENV, "").strip().lower() or "caching"
    if choice not in CPU_ALLOCATORS:
        from mambaclinix.cli._errors import UserError

        raise UserError(
            f"{CPU_ALLOCATOR_ENV}={os.environ[CPU_ALLOCATOR_ENV]!r} is not a CPU allocator",
            hint=f"set it to one of {', '.join(CPU_ALLOCATORS)}, or unset it (default: caching)",
        )
    if choice == "system":
        return False
    from mambaclinix.ops.cpu_allocator import enable_cpu_caching_allocator

    return enable_cpu_caching_allocator()


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``mambaclinix ARGS`` (``argv``, default ``sys.argv[1:]``); exceptions propagate."""
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
