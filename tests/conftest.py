import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported: without a GPU, the Triton scan kernels run in
    # Triton's interpreter on CPU tensors (tests/test_ops_scan_triton.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
