"""How the ``mambaclinix`` command reports errors.

An error the user can fix (bad data, a configuration the Trainer refuses, a missing file, a plan that
does not fit the memory budget, an existing output folder, missing weights) prints one message, with a
hint when there is one, and exits with status 1: no traceback. ``--debug`` (anywhere on the command
line) or the environment variable ``MAMBACLINIX_DEBUG=1`` shows the traceback instead. Any other
exception is a programming error and keeps its traceback.

:data:`USER_ERRORS` names the exception classes that count as user errors, as ``"module:Class"``: a
class is looked up only when its module has already been imported (an exception of a class cannot be
raised before its module is loaded), so that the table costs no import at start-up.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence

__all__ = ["DEBUG_ENV", "USER_ERRORS", "UserError", "debug_requested", "run_command", "user_error_classes"]

DEBUG_ENV = "MAMBACLINIX_DEBUG"
EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user can fix: printed as one message (and the hint, if any), without a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


USER_ERRORS: tuple[str, ...] = (
    "mambaclinix.cli._errors:UserError",
    "mambaclinix.data.cases:DatasetError",  # bad data, an invalid dataset.json, no test cases, ...
    "mambaclinix.planning.planner:PlanningError",  # nothing fits the memory budget
    "mambaclinix.training.guards:NonFiniteTrainingError",
    "mambaclinix.training.cli_support:ConfigurationError",  # a model/data argument its class refuses
    "mambaclinix.training.cli_support:MissingWeightsError",  # validate/test/predict without weights
    "mambaclinix.deploy.metadata:PackageError",  # a damaged, tampered or unexportable model package
    "lightning.fabric.utilities.exceptions:MisconfigurationException",  # the Trainer refuses the config
    "builtins:FileExistsError",  # e.g. demo-data into a folder that holds something else
    "builtins:FileNotFoundError",
    "builtins:NotADirectoryError",
    "builtins:PermissionError",
)

# (pattern of the message, hint) for errors whose own message does not say what to do
_HINTS: tuple[tuple[str, str], ...] = (
    (
        r"dataset\.json not found",
        "point --data.data_dir at the dataset folder (the one holding dataset.json, imagesTr/, labelsTr/)",
    ),
    (
        r"give exactly one of data_dir .* and manifest",
        "give --data.data_dir DIR (a Decathlon / nnU-Net raw folder) or --data.manifest CASES.csv, or a "
        "config that sets one with -c CONFIG.yaml",
    ),
    (
        r"No supported gpu backend found|CUDAAccelerator can not run on your system|"
        r"requested.*gpu.*not available|No CUDA devices",
        "this machine has no usable GPU: add --trainer.accelerator cpu (a configuration planned for a GPU "
        "is sized for GPU memory: plan again with mambaclinix plan DATA_DIR --accelerator cpu)",
    ),
)


def user_error_classes() -> tuple[type[BaseException], ...]:
    """The classes of :data:`USER_ERRORS` whose modules are loaded."""
    found = []
    for entry in USER_ERRORS:
        module_name, _, name = entry.partition(":")
        cls = getattr(sys.modules.get(module_name), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def debug_requested(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """``(debug, argv without --debug)``: ``--debug`` given or ``MAMBACLINIX_DEBUG`` set (not 0/empty)."""
    args = list(argv)
    flag = "--debug" in args
    args = [a for a in args if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return flag or env not in ("", "0", "false", "no"), args


def _hint(err: BaseException) -> str | None:
    hint = getattr(err, "hint", None)
    if hint:
        return hint
    text = str(err)
    for pattern, message in _HINTS:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return message
    return None


def format_user_error(err: BaseException, prog: str = "mambaclinix") -> str:
    """The message printed for a user error: ``prog: error: MESSAGE`` and ``  hint: ...``."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename is not None and not text:
        text = f"{err.strerror}: {err.filename}"
    lines = [f"{prog}: error: {text}"]
    hint = _hint(err)
    if hint:
        lines.append(f"  hint: {hint}")
    lines.append(f"  (--debug or {DEBUG_ENV}=1 shows the traceback)")
    return "\n".join(lines)


def run_command(fn: Callable[[list[str]], object], argv: Sequence[str], prog: str = "mambaclinix") -> None:
    """Run ``fn(argv)`` (``argv`` without ``--debug``) as a command: a user error prints its message and
    exits with status 1, Ctrl-C exits with 130; with ``--debug`` / ``MAMBACLINIX_DEBUG=1`` they raise."""
    debug, args = debug_requested(argv)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # also for the subprocesses (data loader workers, DDP ranks)
        fn(args)
        return
    try:
        fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as err:
        if not isinstance(err, user_error_classes()):
            raise
        sys.stdout.flush()
        print(format_user_error(err, prog), file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
