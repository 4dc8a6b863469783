"""The poison classifier's training step must finish on every CPU kernel family.

torch 2.14.1's oneDNN AVX2 kernels deadlock (two threads) or crash (one thread) on the
backward pass of a narrow ResNet in channels-last format. ``ONEDNN_MAX_CPU_ISA=AVX2`` makes an
AVX-512 machine run those AVX2 kernels too, so this test covers both kinds of CPU wherever it
runs. The hang depends on the data (uniform random pixels pass, the synthetic world's images and
Gaussian inputs hang), so each shape trains on world images and takes a step on Gaussian ones.
Each case runs in a subprocess with a timeout: a deadlock fails in two minutes instead of hanging
the suite.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch

from fastbd.devices import conv_memory_format

# (width, image size, batch) of every classifier the tests, the demo and the presets train.
CLASSIFIER_SHAPES = [(4, 16, 8), (4, 16, 16), (8, 16, 32), (4, 32, 64), (16, 32, 64),
                     (16, 224, 64), (64, 224, 32)]

CHILD = """
import torch
import torch.nn.functional as F
from fastbd.world.synthetic import WorldConfig, make_world
from fastbd.devices import conv_memory_format
from fastbd.detection.classifier import PoisonNet, train_poison_classifier
from fastbd.detection.config import ClassifierConfig

for width, size, batch in {shapes!r}:
    images = make_world(WorldConfig(n_train=48, n_eval=2, image_size=size)).train.images
    side = size // 4
    triggers = images[:2, :, :side, :side].contiguous()
    config = ClassifierConfig(n_models=1, iterations=2, batch_size=batch, width=width,
                              val_every=10, paste_size=(side, 2 * side), paste_margin=0)
    train_poison_classifier(images, torch.arange(4, 48), triggers, torch.arange(2),
                            torch.arange(2, 4), config, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                            verbose=False)
    net = PoisonNet(width, size).to(memory_format=conv_memory_format("cpu"))
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    F.cross_entropy(net(x), torch.arange(batch) % 2).backward()
    print(width, size, batch, "ok", flush=True)
"""

TIMEOUT_S = 120


def run_child(threads: int, isa: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = str(threads)
    if isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", CHILD.format(shapes=CLASSIFIER_SHAPES)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize("threads,isa", [(2, None), (2, "AVX2"), (1, "AVX2")],
                         ids=["native-2-threads", "avx2-2-threads", "avx2-1-thread"])
def test_classifier_training_step_finishes_on_cpu(threads, isa):
    if isa is not None and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("oneDNN's AVX2 kernels exist on x86 only")
    try:
        done = run_child(threads, isa)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"the classifier's training step did not finish in {TIMEOUT_S} s "
                    f"({threads} threads, ISA {isa or 'native'}): deadlocked after\n"
                    f"{timeout.stdout or ''}")
    assert done.returncode == 0, (f"exit {done.returncode} ({threads} threads, ISA "
                                  f"{isa or 'native'}):\n{done.stdout}\n{done.stderr[-2000:]}")
    assert done.stdout.count(" ok") == len(CLASSIFIER_SHAPES)


def test_conv_memory_format_is_contiguous_off_cuda():
    assert conv_memory_format("cpu") == torch.contiguous_format
    assert conv_memory_format(torch.device("cuda", 0)) == torch.channels_last
