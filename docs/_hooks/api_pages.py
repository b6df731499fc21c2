"""MkDocs hook: the API reference pages, generated at build time from the packages' ``__all__`` lists.

Every package of ``mambaclinix`` whose ``__init__.py`` defines ``__all__`` gets a section; every public
class in it gets its own page (``api/<package>/<Class>.md``), and its public functions and constants
share one page (``api/<package>/functions.md``). An object re-exported by several packages (such as
``mambaclinix.MambaClinixUNet`` = ``mambaclinix.models.MambaClinixUNet``) is documented once, in the
most specific package; ``api/index.md`` lists every public name with a link. The section replaces the
``API reference`` entry of the ``nav`` in mkdocs.yml.

Names a package loads lazily (``__all__ = [..., *_LAZY]`` with ``_LAZY = {"Name": "defining.module"}``,
as :mod:`mambaclinix.data` does) are documented at their defining module. Nothing is imported: the
package is read statically by griffe, so the build needs neither torch nor the optional dependencies.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import griffe
from mkdocs.structure.files import File

_spec = importlib.util.spec_from_file_location("sphinx_roles", Path(__file__).with_name("sphinx_roles.py"))
_roles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_roles)
strip_roles = _roles.strip_roles

log = logging.getLogger("mkdocs.hooks.api_pages")

PACKAGE = "mambaclinix"
NAV_TITLE = "API reference"
# Page order within the section: the user-facing packages first.
ORDER = ["models", "layers", "losses", "metrics", "inference", "data", "training", "deploy", "ops"]


@dataclass
class Entry:
    name: str  # public name
    package: str  # dotted package that exports it
    path: str  # dotted path mkdocstrings collects (public, or the defining module for lazy names)
    canonical: str  # dotted path of the definition
    kind: str  # "class", "function", "attribute", "module"
    summary: str


@dataclass
class Section:
    package: str
    entries: list[Entry] = field(default_factory=list)
    pages: dict[str, str] = field(default_factory=dict)  # uri -> Markdown


_SECTIONS: list[Section] = []


def _literal(module: griffe.Module, name: str) -> object:
    member = module.members.get(name)
    if member is None or member.is_alias or getattr(member, "value", None) is None:
        raise ValueError(f"{module.path}.__all__ refers to {name!r}, which is not a literal in that module")
    return ast.literal_eval(str(member.value))


def _exports(module: griffe.Module) -> list[tuple[str, str]]:
    """(public name, path to collect) for every name in ``module.__all__``."""
    out: list[tuple[str, str]] = []
    for item in module.exports or []:
        if isinstance(item, str):
            out.append((item, f"{module.path}.{item}"))
            continue
        value = _literal(module, str(item))  # a starred name: a lazy map {name: module} or a list
        if isinstance(value, dict):
            out.extend((n, f"{target}.{n}") for n, target in value.items())
        else:
            out.extend((n, f"{module.path}.{n}") for n in value)
    return out


def _summary(obj: griffe.Object) -> str:
    if obj.docstring is None:
        value = getattr(obj, "value", None)
        if value is None:
            return ""
        if isinstance(value, griffe.ExprName) and obj.parent is not None:
            try:
                target = obj.parent[str(value)]
                return f"alias of [`{value}`][{target.final_target.path if target.is_alias else target.path}]"
            except (KeyError, griffe.AliasResolutionError):
                pass
        text = str(value)
        return f"`{text}`" if len(text) <= 60 and "|" not in text and "`" not in text else ""
    first = obj.docstring.value.strip().split("\n\n", 1)[0]
    return strip_roles(" ".join(first.split())).replace("|", "\\|")


def _resolve(root: griffe.Module, path: str) -> griffe.Object:
    obj = root[path[len(PACKAGE) + 1 :]] if path != PACKAGE else root
    return obj.final_target if obj.is_alias else obj


def _packages(root: griffe.Module) -> list[griffe.Module]:
    found = []
    stack = [root]
    while stack:
        mod = stack.pop()
        if "__all__" in mod.members:
            found.append(mod)
        stack.extend(m for m in mod.modules.values() if m.is_init_module)
    rank = {f"{PACKAGE}.{n}": i for i, n in enumerate(ORDER)}
    # Most specific first (so re-exports are claimed by the subpackage), then the preferred order.
    return sorted(found, key=lambda m: (m.path == PACKAGE, rank.get(m.path, len(rank)), m.path))


def build_sections(src_dir: Path) -> list[Section]:
    """Read the package under ``src_dir`` and lay out the API pages."""
    root = griffe.load(PACKAGE, search_paths=[str(src_dir)], docstring_parser="google", resolve_aliases=True)
    claimed: dict[str, Entry] = {}
    sections = []
    for module in _packages(root):
        section = Section(module.path)
        for name, path in _exports(module):
            try:
                obj = _resolve(root, path)
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError) as exc:
                raise ValueError(f"{module.path}.__all__ lists {name!r} but {path} cannot be found") from exc
            if obj.is_module and name in obj.members:
                # ``from .causal_conv1d import causal_conv1d``: the function shadows its submodule
                path, obj = f"{obj.path}.{name}", _resolve(root, f"{obj.path}.{name}")
            kind = obj.kind.value
            entry = Entry(name, module.path, path, obj.path, kind, _summary(obj))
            section.entries.append(entry)
            claimed.setdefault(obj.path, entry)
        sections.append(section)

    for section in sections:
        short = section.package.removeprefix(PACKAGE).lstrip(".") or PACKAGE
        own = [e for e in section.entries if claimed[e.canonical] is e and e.name != "__version__"]
        for e in own:
            if e.kind == "class":
                section.pages[f"api/{short}/{e.name}.md"] = (
                    f"# {e.name}\n\n`from {section.package} import {e.name}`\n\n"
                    f"::: {e.path}\n    options:\n      heading_level: 2\n      show_root_full_path: false\n"
                )
        others = [e for e in own if e.kind != "class"]
        if others:
            names = ", ".join(e.name for e in others)
            body = [
                f"# {section.package}: functions and constants\n",
                f"`from {section.package} import {names}`\n",
            ]
            for e in others:
                body.append(
                    f"::: {e.path}\n    options:\n      heading_level: 2\n      show_root_full_path: false\n"
                )
            section.pages[f"api/{short}/functions.md"] = "\n".join(body)
    return sections


def _index(sections: list[Section]) -> str:
    lines = [
        "# API reference\n",
        "Every public name of the package, by the package that exports it (its `__all__`). Each class has a",
        "page; functions and constants share one page per package. These pages are generated from the",
        "docstrings when the site is built.\n",
    ]
    for section in sections:
        if not section.entries:
            continue
        lines += [f"## `{section.package}`\n", "| name | kind | summary |", "|---|---|---|"]
        for e in section.entries:
            if e.name == "__version__":
                lines.append(f"| `{e.name}` | {e.kind} | the package version |")
                continue
            lines.append(f"| [`{e.name}`][{e.canonical}] | {e.kind} | {e.summary} |")
        lines.append("")
    return "\n".join(lines)


def on_config(config, **kwargs):
    src_dir = Path(config.config_file_path).parent
    _SECTIONS[:] = build_sections(src_dir)
    api_nav: list = [{"Overview": "api/index.md"}]
    for section in _SECTIONS:
        if not section.pages:
            continue
        items = []
        for uri in section.pages:
            stem = uri.rsplit("/", 1)[-1].removesuffix(".md")
            items.append({"Functions and constants" if stem == "functions" else stem: uri})
        api_nav.append({section.package: items})
    for i, item in enumerate(config.nav or []):
        if isinstance(item, dict) and NAV_TITLE in item:
            config.nav[i] = {NAV_TITLE: api_nav}
            break
    else:
        log.warning("mkdocs.yml nav has no %r entry: the API pages are not in the navigation", NAV_TITLE)
    return config


def on_files(files, config, **kwargs):
    files.append(File.generated(config, "api/index.md", content=_index(_SECTIONS)))
    for section in _SECTIONS:
        for uri, text in section.pages.items():
            files.append(File.generated(config, uri, content=text))
    return files
