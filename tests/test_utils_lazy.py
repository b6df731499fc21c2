"""``mambaclinix.utils.lazy``: attributes imported on first access, cached, listed by ``dir``."""

import sys
import types

import pytest

from mambaclinix.utils.lazy import lazy_attributes


@pytest.fixture
def package(monkeypatch):
    pkg = types.ModuleType("fake_lazy_pkg")
    monkeypatch.setitem(sys.modules, "fake_lazy_pkg", pkg)
    pkg.__getattr__, pkg.__dir__ = lazy_attributes("fake_lazy_pkg", {"sqrt": "math", "dedent": "textwrap"})
    return pkg


def test_loads_on_access_and_caches(package, monkeypatch):
    monkeypatch.delitem(sys.modules, "textwrap", raising=False)
    assert "dedent" not in vars(package)
    import math

    assert package.sqrt is math.sqrt
    assert vars(package)["sqrt"] is math.sqrt  # cached: later lookups skip __getattr__
    assert "textwrap" not in sys.modules  # only what was asked for is imported
    assert package.dedent("  a\n  b") == "a\nb"


def test_dir_lists_lazy_names_and_unknown_names_raise(package):
    assert {"sqrt", "dedent"} <= set(dir(package))
    with pytest.raises(AttributeError, match="fake_lazy_pkg.*'nope'"):
        getattr(package, "nope")  # noqa: B009
