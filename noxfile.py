"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s docs``, ``nox -s bench``."""

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
def docs(session: nox.Session) -> None:
    """The documentation site, warnings as errors (``mkdocs build --strict``) into ``site/``.

    Only the ``docs`` extra is installed: the API pages are read from the source without importing it.
    """
    session.install(*nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]["docs"])
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """The selective-scan benchmark (results/scan_cpu.json), the model comparison at 64³ and 96³, batch 2
    (results/models_cpu.{json,md,png}; long on a small CPU) and the pytest-benchmark suite.

    dynamic-network-architectures is installed without its dependencies: they would pull timm and
    torchvision (needed by its ViT models only), and torchvision a different torch.
    """
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.install("--no-deps", "dynamic-network-architectures>=0.4")
    session.run("python", "benchmarks/bench_scan.py", "--json", "results/scan_cpu.json", *session.posargs)
    session.run("python", "benchmarks/bench_models.py", "--sizes", "64", "96", "--batch", "2",
                "--rounds", "2", "--repeats", "1", "--sw-sizes", "64", "--json", "results/models_cpu.json",
                "--markdown", "results/models_cpu.md", "--plot", "results/models_cpu.png")  # fmt: skip
    session.run("pytest", "benchmarks", "--benchmark-only")
