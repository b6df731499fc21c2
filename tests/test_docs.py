"""The documentation: runnable code blocks execute, the API pages cover the public API, the site builds.

A fenced ``python`` block in ``docs/**/*.md`` or ``README.md`` directly preceded by the line
``<!-- runnable -->`` is executed here (see docs/contributing.md). The blocks of one page run in order in
one namespace, in a temporary working directory, with tracebacks pointing at the page's own lines.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    runnable: bool


def read_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with whether the runnable marker precedes it.

    Raises:
        ValueError: a marker that is not directly followed by a fenced block, or an unclosed fence.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i, pending = [], 0, None
    while i < len(lines):
        text = lines[i]
        if text.strip() == MARKER:
            pending = i + 1
            i += 1
            continue
        match = FENCE.match(text)
        if match is None:
            if pending is not None and text.strip():
                raise ValueError(f"{path}:{pending}: {MARKER} must be directly followed by a fenced block")
            i += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"]
        if pending is not None and pending != i:
            raise ValueError(f"{path}:{pending}: {MARKER} must be on the line right before the fence")
        body, j = [], i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""
        ):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        blocks.append(Block(path, i + 2, lang, "\n".join(body) + "\n", pending is not None))
        pending = None
        i = j + 1
    if pending is not None:
        raise ValueError(f"{path}:{pending}: {MARKER} at the end of the file")
    return blocks


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.runnable for b in read_blocks(p))]


def _page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ----------------------------------------------------------------------------------------- the marker


def test_marker_parsing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- runnable -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
        "- item\n\n  <!-- runnable -->\n  ```python\n  z = 3\n  ```\n",
        encoding="utf-8",
    )
    blocks = read_blocks(page)
    assert [(b.line, b.code, b.runnable) for b in blocks] == [
        (5, "x = 1\n", True),
        (9, "y = 2\n", False),
        (15, "z = 3\n", True),
    ]
    page.write_text("<!-- runnable -->\nsome text\n```python\nx = 1\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="directly followed"):
        read_blocks(page)


def test_every_marker_is_on_a_python_block():
    runnable = [b for p in PAGES for b in read_blocks(p) if b.runnable]
    assert runnable, "no runnable blocks found"
    wrong = [
        f"{_page_id(b.path)}:{b.line} ({b.lang or 'no language'})" for b in runnable if b.lang != "python"
    ]
    assert not wrong, f"{MARKER} marks non-Python blocks: {wrong}"


# ------------------------------------------------------------------------------------ runnable blocks


@pytest.mark.parametrize("page", _runnable_pages(), ids=_page_id)
def test_runnable_blocks(page, tmp_path, monkeypatch):
    from mambaclinix.models import registry
    from mambaclinix.ops import backend

    # Pages may register presets or change the default backend: undo that after the page.
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(backend, "_default_backend", backend._default_backend)
    monkeypatch.delenv("MAMBACLINIX_SCAN_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict = {"__name__": "__doc_page__"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for block in (b for b in read_blocks(page) if b.runnable):
            # Pad so that tracebacks show the Markdown file's own line numbers.
            code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
            exec(code, namespace)


# --------------------------------------------------------------------------------------- API pages


def _load_hook():
    spec = importlib.util.spec_from_file_location("api_pages", ROOT / "docs/_hooks/api_pages.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _public_classes() -> dict[str, set[str]]:
    """Public classes per package, found by importing the packages (independent of the static reader)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "mambaclinix").rglob("__init__.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            continue
        found[name] = {
            n for n in exported if inspect.isclass(getattr(module, n)) and getattr(module, n).__name__ == n
        }
    return found


def test_api_pages_cover_every_public_class():
    sections = {s.package: s for s in _load_hook().build_sections(ROOT)}
    documented = {}  # class -> page
    for section in sections.values():
        for entry in section.entries:
            if entry.kind == "class":
                documented.setdefault(entry.canonical.rsplit(".", 1)[-1], set()).add(entry.package)
    pages = {uri for s in sections.values() for uri in s.pages}
    for package, classes in _public_classes().items():
        assert package in sections, f"{package} has __all__ but no API section"
        for cls in classes:
            assert cls in documented, f"{package}.{cls} has no API page"
            homes = [
                f"api/{p.removeprefix('mambaclinix').lstrip('.') or 'mambaclinix'}/{cls}.md"
                for p in documented[cls]
            ]
            assert any(h in pages for h in homes), f"{package}.{cls}: none of {homes} is generated"


# ------------------------------------------------------------------------------------------ the figure


def test_architecture_figure_shows_the_paper_network():
    """The figure's stages (channels, HGCN/Mamba split) are those of the paper preset, and the committed
    SVG is the script's drawing of them."""
    from mambaclinix import create_model

    spec = importlib.util.spec_from_file_location(
        "make_architecture", ROOT / "docs/figures/make_architecture.py"
    )
    figure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure)
    model = create_model("mambaclinix_paper")
    assert tuple(figure.CHANNELS) == model.features_per_stage
    drawn = tuple("hgcn" if s < figure.N_HGCN else "mamba" for s in range(figure.N_STAGES))
    assert drawn == model.stage_layer_types
    svg = (ROOT / "docs/figures/architecture.svg").read_text(encoding="utf-8")
    for s, channels in enumerate(model.features_per_stage):
        assert f"stage {s}  ·  {channels} ch" in svg, s
    assert svg.count("HGCN block (order") == 3 and svg.count("residual Mamba layer") == 3 + 1  # + legend


# ------------------------------------------------------------------------------------------ the site


def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: broken links, unknown pages, docstring warnings all fail."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail('mkdocs is not installed: pip install -e ".[docs]" (the dev extra includes it)')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"mkdocs build --strict failed after {seconds:.1f} s:\n{proc.stderr}"
    assert (tmp_path / "site/api/layers/HGCNBlock/index.html").is_file()
    assert (tmp_path / "site/figures/architecture.svg").is_file()
