"""``mambaclinix fit|validate|test|predict``: Lightning's ``LightningCLI`` over the segmentation module and
data module (:func:`mambaclinix.training.lightning_cli`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


def show_progress_messages() -> None:
    """Print the library's INFO messages (the dataset check, the preprocessing, ``--ckpt_path last``)
    as plain lines on stderr: a handler on the ``mambaclinix`` logger, unless the root logger already has
    one (then the messages go there, once)."""
    logger = logging.getLogger("mambaclinix")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if logging.getLogger().handlers or any(getattr(h, "_mambaclinix_cli", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._mambaclinix_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def lightning_main(argv: Sequence[str] | None) -> None:
    """Run the LightningCLI on ``argv`` (the subcommand first; ``None``: ``sys.argv[1:]``);
    ``predict -i IN -o OUT -m MODEL`` predicts with a model package instead
    (:mod:`mambaclinix.cli.predict_package`)."""
    if argv is not None and list(argv[:1]) == ["predict"]:
        from mambaclinix.cli.predict_package import predict_package_main, wants_package_predict

        if wants_package_predict(argv[1:]):
            return predict_package_main(argv[1:])
    from mambaclinix.training.lightning_cli import lightning_cli

    show_progress_messages()
    lightning_cli(None if argv is None else list(argv))
