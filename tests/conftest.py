import os
import socket

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported, so on a machine without CUDA every kernel must
# be interpreted whichever test file imports them first. (GPU test files run in processes of their own.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
