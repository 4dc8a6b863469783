"""Test setup: the Triton interpreter for CPU kernel tests, fresh seeds, device parameters.

``TRITON_INTERPRET`` must be set before any kernel module is imported, hence at the very top.
Every test that takes ``gen`` gets a generator with a fresh seed, printed so that a failure can be
replayed with ``FASTBD_TEST_SEED=<seed>``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import secrets  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from testutil import HAS_CUDA, cuda  # noqa: E402


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("FASTBD_TEST_SEED", secrets.randbits(31)))
    print(f"FASTBD_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(cuda)
