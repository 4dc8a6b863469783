import numpy as np
import pytest
import torch

from fastbd.ops import (
    available_backends,
    backend_available,
    choose_backend,
    cosine_topk,
    kmeans_assign,
    mask_fill,
    pair_cosine,
    paste,
    register_backend,
    unregister_backend,
    window_argmax,
)
from fastbd.ops._backend import registered_ops
from fastbd.smoke import SmokeConfig, run_smoke

from testutil import cuda


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


@pytest.fixture
def numpy_pair_cosine():
    """A pair_cosine backend from outside fastbd (NumPy), removed after the test."""
    calls = []

    def pair_cosine_numpy(*, a, b, eps):
        calls.append({"a": a, "b": b, "eps": eps})
        x, y = a.double().numpy(), b.double().numpy()
        norms = np.maximum(np.linalg.norm(x, axis=1), eps) * np.maximum(
            np.linalg.norm(y, axis=1), eps)
        return torch.from_numpy((x * y).sum(1) / norms).float()

    register_backend("pair_cosine", "numpy", pair_cosine_numpy, devices=("cpu",))
    yield calls
    unregister_backend("pair_cosine", "numpy")


def test_a_registered_backend_runs_when_asked_for(numpy_pair_cosine, gen):
    a, b = torch.randn(20, 8, generator=gen), torch.randn(20, 8, generator=gen)
    assert choose_backend("pair_cosine", "cpu") == "torch"  # not preferred: asked for only
    assert "numpy" in available_backends("pair_cosine", "cpu")
    got = pair_cosine(a, b, backend="numpy", eps=1e-6)
    assert numpy_pair_cosine[-1]["eps"] == 1e-6 and numpy_pair_cosine[-1]["a"] is a
    torch.testing.assert_close(got, pair_cosine(a, b, backend="torch"))
    with pytest.raises(ValueError, match="contains 8 NaN"):  # fastbd's checks still run first
        pair_cosine(torch.full((1, 8), float("nan")), b[:1], backend="numpy")
    assert len(numpy_pair_cosine) == 1
    with pytest.raises(ValueError, match="registered for cpu"):
        choose_backend("pair_cosine", "meta", "numpy")


def test_a_preferred_backend_is_the_default_and_unregistering_restores(gen):
    register_backend("cosine_topk", "brute", lambda **kw: ("brute", kw["k"]), devices=("cpu",),
                     prefer=True)
    try:
        assert choose_backend("cosine_topk", "cpu") == "brute"
        assert cosine_topk(torch.randn(3, 4), torch.randn(5, 4), 2) == ("brute", 2)
    finally:
        unregister_backend("cosine_topk", "brute")
    assert choose_backend("cosine_topk", "cpu") == "torch"
    assert "brute" not in available_backends("cosine_topk", "cpu")
    with pytest.raises(ValueError, match="has no registered backend"):
        unregister_backend("cosine_topk", "brute")


def test_an_unavailable_registered_backend_is_skipped():
    register_backend("window_argmax", "absent", lambda **kw: None, devices=("cpu",),
                     prefer=True, available=lambda: False)
    try:
        assert choose_backend("window_argmax", "cpu") == "torch"
        with pytest.raises(ValueError, match="availability check failed"):
            choose_backend("window_argmax", "cpu", "absent")
    finally:
        unregister_backend("window_argmax", "absent")


def test_the_smoke_run_checks_registered_backends(numpy_pair_cosine):
    result = run_smoke("cpu", SmokeConfig(image_size=12, n_images=2, n_masks=2, window=4,
                                          n_features=40, dim=16, n_clusters=3))
    checks = [c for c in result.checks if c.backend == "numpy"]
    assert [c.op for c in checks] == ["pair_cosine"] and checks[0].ok


@pytest.mark.parametrize("op,name,error", [
    ("kmeans", "mine", "takes no registered backends"),
    ("paste", "torch", "built-in backend name"),
    ("paste", "not a name", "identifier"),
    ("nothing", "mine", "unknown op"),
])
def test_register_backend_refuses(op, name, error):
    with pytest.raises(ValueError, match=error):
        register_backend(op, name, lambda **kw: None)
    with pytest.raises(ValueError, match="device types"):
        register_backend("paste", "mine", lambda **kw: None, devices="cuda")


@pytest.mark.parametrize("call", [
    lambda x, v: cosine_topk(x, x, 2, validate=v),
    lambda x, v: pair_cosine(x, x, validate=v),
    lambda x, v: kmeans_assign(x, x[:2], validate=v),
    lambda x, v: window_argmax(x[None], 2, validate=v),
], ids=["cosine_topk", "pair_cosine", "kmeans_assign", "window_argmax"])
def test_validate_false_skips_the_finiteness_check(call):
    x = torch.randn(6, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        call(x, True)
    call(x, False)  # unchecked: runs, the result is unspecified


@cuda
@pytest.mark.cuda
def test_hot_paths_never_wait_for_the_host_with_validate_false():
    """paste, mask_fill, kmeans_assign and cosine_topk through Triton with validate=False queue
    their work without one host synchronisation, once warm."""
    device = torch.device("cuda")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device=device)
    patches = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, device=device)
    jobs = [torch.tensor(v, device=device) for v in ([0, 3], [1, 0], [2, -1], [30, 5])]
    positions = torch.randint(0, 32, (4, 3, 2), device=device)
    x = torch.randn(100, 32, device=device)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def hot_loop_step():
        paste(images, patches, *jobs, mean=mean, std=std, backend="triton", validate=False)
        mask_fill(images, positions, 8, mean, std, backend="triton", validate=False)
        kmeans_assign(x, x[:10], backend="triton", validate=False)
        cosine_topk(x, x, 5, backend="triton", validate=False)

    hot_loop_step()  # the first call compiles, autotunes and caches the normalisation constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hot_loop_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
