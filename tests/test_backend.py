import pytest
import torch

from fastbd.ops import available_backends, backend_available, choose_backend
from fastbd.ops._backend import registered_ops


def test_every_op_is_registered():
    assert set(registered_ops()) >= {"mask_fill", "paste", "kmeans", "kmeans_assign",
                                     "cosine_topk", "pair_cosine", "window_argmax"}


def test_cpu_default_is_torch_even_with_interpreter():
    for op in registered_ops():
        assert choose_backend(op, "cpu") == "torch"


def test_cuda_default_is_torch_until_a_gpu_measurement_says_otherwise():
    for op in registered_ops():
        assert choose_backend(op, "cuda") == "torch"


def test_per_call_beats_environment(monkeypatch):
    monkeypatch.setenv("FASTBD_BACKEND", "torch")
    assert choose_backend("mask_fill", "cpu", "triton") == "triton"


def test_environment_beats_default(monkeypatch):
    monkeypatch.setenv("FASTBD_BACKEND", "triton")
    assert choose_backend("paste", "cpu") == "triton"
    # An op without that backend ignores the variable.
    assert choose_backend("window_argmax", "cpu") == "torch"


def test_environment_ignored_where_unavailable(monkeypatch):
    monkeypatch.setenv("FASTBD_BACKEND", "cupy")
    assert choose_backend("pair_cosine", "cpu") == "torch"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend_available("triton", "cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose_backend("mask_fill", "cpu", "triton")
    assert available_backends("mask_fill", "cpu") == ["torch"]


def test_gpu_libraries_need_cuda():
    assert not backend_available("cupy", "cpu")
    assert not backend_available("cuml", torch.device("cpu"))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown op"):
        choose_backend("fft", "cpu")
    with pytest.raises(ValueError, match="not implemented"):
        choose_backend("mask_fill", "cpu", "cupy")
    with pytest.raises(ValueError, match="unknown backend"):
        backend_available("opencl", "cpu")
