"""Every public op's docstring example runs and shows what it says (doctest)."""

import doctest
import importlib

import pytest

import fastbd.ops

MODULES = ["fastbd.ops.cosine", "fastbd.ops.kmeans", "fastbd.ops.mask_fill", "fastbd.ops.paste",
           "fastbd.ops.window_argmax"]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_every_public_op_has_an_example():
    ops = ["mask_fill", "paste", "kmeans_assign", "KMeans", "cosine_topk", "pair_cosine",
           "window_argmax", "window_sums"]
    missing = [op for op in ops if ">>> " not in (getattr(fastbd.ops, op).__doc__ or "")]
    assert missing == []
