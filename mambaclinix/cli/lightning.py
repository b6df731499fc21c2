"""``mambaclinix fit|validate|test|predict``: Lightning's ``LightningCLI`` over the segmentation module and
data module (:func:`mambaclinix.training.lightning_cli`)."""

from __future__ import annotations

from collections.abc import Sequence


def lightning_main(argv: Sequence[str] | None) -> None:
    """Run the LightningCLI on ``argv`` (the subcommand first; ``None``: ``sys.argv[1:]``)."""
    from mambaclinix.training.lightning_cli import lightning_cli

    lightning_cli(None if argv is None else list(argv))
