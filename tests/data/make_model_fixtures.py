"""Write the model fixtures that ``tests/test_model_state_compat.py`` loads.

    python tests/data/make_model_fixtures.py

They pin the network as it was when they were written (state-dict keys, shapes, seeded initialisation,
outputs), so that a later restructuring of the code can be checked against them. Rewrite them only on
purpose, for a deliberate change of the parameters or of the computation.

- ``mambaclinix_tiny.npz``: the ``mambaclinix_tiny`` preset built after ``torch.manual_seed(0)``
  (``state/<key>``, float32), a fixed input ``input`` of shape (1, 1, 16, 16, 8) (float64) and the
  deep-supervision outputs ``output/<t>`` of the float64 network in eval mode with the sequential
  ``"reference"`` scan.
- ``mambaclinix_paper_state.json``: every key of the ``mambaclinix_paper`` state dict, in order, with its
  shape, and the parameter count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mambaclinix import create_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.manual_seed(0)
    tiny = create_model("mambaclinix_tiny", scan_backend="reference")
    arrays = {f"state/{k}": v.numpy() for k, v in tiny.state_dict().items()}
    x = torch.randn(1, 1, 16, 16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        outputs = tiny.double().eval()(x)
    arrays["input"] = x.numpy()
    arrays.update({f"output/{t}": o.numpy() for t, o in enumerate(outputs)})
    np.savez_compressed(HERE / "mambaclinix_tiny.npz", **arrays)

    with torch.device("meta"):
        paper = create_model("mambaclinix_paper")
    entries = [json.dumps([k, list(v.shape)]) for k, v in paper.state_dict().items()]
    count = sum(p.numel() for p in paper.parameters())
    text = f'{{"num_parameters": {count},\n "state_dict": [\n  ' + ",\n  ".join(entries) + "\n]}\n"
    (HERE / "mambaclinix_paper_state.json").write_text(text)


if __name__ == "__main__":
    main()
