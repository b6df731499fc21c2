"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s bench``."""

import nox

nox.options.sessions = ["tests", "lint"]
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite in a fresh environment."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """The selective-scan benchmark (writes results/scan_cpu.json) and the pytest-benchmark suite."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("python", "benchmarks/bench_scan.py", "--json", "results/scan_cpu.json", *session.posargs)
    session.run("pytest", "benchmarks", "--benchmark-only")
