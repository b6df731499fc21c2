"""State dicts written by earlier versions keep loading: the fixtures in ``tests/data`` pin the parameter
names and shapes, the seeded initialisation and the outputs of the networks (written by
``tests/data/make_model_fixtures.py``; see its docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mambaclinix import create_model

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def tiny_fixture() -> dict[str, np.ndarray]:
    with np.load(DATA / "mambaclinix_tiny.npz") as f:
        return {k: f[k] for k in f.files}


def _saved_state(fixture: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k[len("state/") :]: torch.from_numpy(v) for k, v in fixture.items() if k.startswith("state/")}


def test_saved_tiny_state_dict_loads_strictly_and_gives_the_saved_outputs(tiny_fixture):
    model = create_model("mambaclinix_tiny", scan_backend="reference")
    model.load_state_dict(_saved_state(tiny_fixture), strict=True)
    model = model.double().eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(tiny_fixture["input"]))
    expected = [tiny_fixture[f"output/{t}"] for t in range(model.n_stages - 1)]
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, torch.from_numpy(ref), rtol=1e-12, atol=1e-12)


def test_seeded_tiny_initialisation_is_unchanged(tiny_fixture):
    torch.manual_seed(0)
    state = create_model("mambaclinix_tiny").state_dict()
    saved = _saved_state(tiny_fixture)
    assert list(state) == list(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def test_paper_state_dict_keys_shapes_and_count():
    listing = json.loads((DATA / "mambaclinix_paper_state.json").read_text())
    with torch.device("meta"):
        model = create_model("mambaclinix_paper")
    state = model.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == listing["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == listing["num_parameters"] == 48_883_846
    # no buffers and no parameter under a second name: the parameters are exactly the state dict
    assert [name for name, _ in model.named_parameters()] == list(state)
