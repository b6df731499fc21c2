"""``mambaclinix fit|validate|test|predict``: Lightning's ``LightningCLI`` over the segmentation module and
data module (:func:`mambaclinix.training.lightning_cli`)."""

from __future__ import annotations

from collections.abc import Sequence


def lightning_main(argv: Sequence[str] | None) -> None:
    """Run the LightningCLI on ``argv`` (the subcommand first; ``None``: ``sys.argv[1:]``);
    ``predict -i IN -o OUT -m MODEL`` predicts with a model package instead
    (:mod:`mambaclinix.cli.predict_package`)."""
    if argv is not None and list(argv[:1]) == ["predict"]:
        from mambaclinix.cli.predict_package import predict_package_main, wants_package_predict

        if wants_package_predict(argv[1:]):
            return predict_package_main(argv[1:])
    from mambaclinix.training.lightning_cli import lightning_cli

    lightning_cli(None if argv is None else list(argv))
