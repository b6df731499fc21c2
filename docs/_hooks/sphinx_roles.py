"""Griffe extension for the API pages: Sphinx cross-reference roles in docstrings become Markdown.

The package's docstrings are Google style but refer to other objects the Sphinx way
(``:class:`~mambaclinix.data.SegmentationDataModule```, ``:func:`plan_topology```), which Markdown would
show verbatim. Once the package is loaded, every role is replaced by

- a cross-reference ``[`Name`][identifier]`` when its target (absolute, or relative to the docstring's
  module) is an object that has its own entry in the API pages (docs/_hooks/api_pages.py);
- inline code otherwise (private modules, methods, objects of other packages).

``~a.b.C`` shows ``C``, ``a.b.C`` shows ``a.b.C`` and ``text <a.b>`` shows ``text``, as in Sphinx. A
reST literal-block marker (a paragraph ending in ``::``) becomes a single colon.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|obj|data|exc|const):`([^`]+)`")
LITERAL = re.compile(r"(?<=\S)::\n[ \t]*\n")


def _split(text: str) -> tuple[str, str]:
    """(label, target) of a role's text."""
    text = text.strip()
    labelled = re.fullmatch(r"(.+?)\s*<([^>]+)>", text)
    if labelled:
        return labelled.group(1), labelled.group(2).lstrip("~")
    if text.startswith("~"):
        return text[1:].rsplit(".", 1)[-1], text[1:]
    return text, text


def strip_roles(text: str) -> str:
    """Replace every Sphinx cross-reference role in ``text`` by inline code."""
    return ROLE.sub(lambda m: f"`{_split(m.group(1))[0]}`", text)


def _lookup(scope: griffe.Object, dotted: str) -> griffe.Object | None:
    obj: griffe.Object = scope
    try:
        for part in dotted.split("."):
            obj = obj.members[part]
            if obj.is_alias:
                obj = obj.final_target
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    return obj


def _api_pages():
    name = "mambaclinix_docs_api_pages"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("api_pages.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:  # noqa: D102
        src_dir = Path(pkg.filepath).parent.parent if pkg.filepath else Path.cwd()
        documented = {}  # canonical path -> identifier of its API entry
        for section in _api_pages().build_sections(src_dir):
            for entry in section.entries:
                documented.setdefault(entry.canonical, entry.path)

        def resolve(obj: griffe.Object, target: str) -> str | None:
            module = obj if obj.is_module else obj.module
            for scope, dotted in (
                (pkg, target.removeprefix(f"{pkg.name}."))
                if target.startswith(f"{pkg.name}.")
                else (None, ""),
                (module, target),
            ):
                if scope is None:
                    continue
                found = _lookup(scope, dotted)
                if found is not None and found.path in documented:
                    return documented[found.path]
            return None

        def rewrite(obj: griffe.Object) -> None:
            if obj.docstring is not None:

                def replace(match: re.Match[str]) -> str:
                    label, target = _split(match.group(1))
                    identifier = resolve(obj, target)
                    return f"[`{label}`][{identifier}]" if identifier else f"`{label}`"

                text = ROLE.sub(replace, obj.docstring.value)
                # reST "paragraph::" + indented block: Markdown already reads the block as code.
                obj.docstring.value = LITERAL.sub(":\n\n", text)
            for member in obj.members.values():
                if not member.is_alias:
                    rewrite(member)

        rewrite(pkg)
