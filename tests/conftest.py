"""Test setup: the Triton interpreter for CPU kernel tests, seeds, device parameters.

``TRITON_INTERPRET`` must be set before any kernel module is imported, hence at the very top.
Every test that takes ``gen`` gets a generator with a seed that is fixed per test (a hash of its
name), printed, so a failure replays as it is; ``FASTBD_TEST_SEED=<int>`` sets it for every test,
``FASTBD_TEST_SEED=random`` draws fresh ones (printed too) to explore.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import secrets  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from testutil import HAS_CUDA, cuda  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    chosen = os.environ.get("FASTBD_TEST_SEED")
    if chosen is None:
        value = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    elif chosen == "random":
        value = secrets.randbits(31)
    else:
        value = int(chosen)
    print(f"FASTBD_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(cuda)
