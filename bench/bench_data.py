"""Reading image files into a bank: ``ImageBank.from_files`` on its threads beside one thread.

The files are ImageNet-sized JPEGs (500×375) read through the eval transform at 224 px, the
case where decoding dominates and ``from_files`` hands the files to threads; ``workers=1`` is
the plain one-file-at-a-time read. Files per second are recorded for both.
"""

import numpy as np
import pytest
from PIL import Image

from fastbd.data.bank import ImageBank

from benchutil import record_rates, run

N_FILES = 96


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(N_FILES):
        freq, phase = rng.uniform(0.01, 0.05, 3), rng.uniform(0, 6, 3)
        image = np.stack([127 + 120 * np.sin(freq[c] * x + phase[c]) * np.cos(freq[c] * y)
                          for c in range(3)], -1) + rng.normal(0, 8, (375, 500, 3))
        paths.append(root / f"{i:03d}.jpg")
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


@pytest.mark.parametrize("workers", [1, None], ids=["one-thread", "threads"])
def test_read_jpegs(benchmark, jpegs, workers):
    run(benchmark, lambda: ImageBank.from_files(jpegs, 224, verbose=False, workers=workers),
        rounds=3, files=N_FILES, workers=workers or "default")
    record_rates(benchmark, files=N_FILES)
