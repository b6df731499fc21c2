"""``python -m mambaclinix.cli``: the same as the ``mambaclinix`` command."""

from mambaclinix.cli import run

run()
