import os
import socket

import pytest
import torch



def gpu_run(config) -> bool:
    """`pytest -m gpu` on a machine with CUDA: the kernels compile for the GPU. Any other run interprets them."""
    markexpr = config.getoption("markexpr") or ""
    return torch.cuda.is_available() and "gpu" in markexpr and "not gpu" not in markexpr


def pytest_configure(config):
    # The one place TRITON_INTERPRET is set. Triton reads it when a kernel is defined, i.e. when a kernel module
    # is first imported, so it must be decided before any test module is collected; spawned ranks inherit it.
    if not gpu_run(config):
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
