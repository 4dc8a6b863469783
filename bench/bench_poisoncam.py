"""PoisonCAM stage throughput beside the encoder alone.

The masking stage (``candidate_windows``: ``mask_fill`` into a reused buffer, encode, assign,
attention maps, window search) and the flip stage (``flip_counts``: ``paste`` into a reused
buffer, encode, assign, count) are timed per image encoded, next to the same encoder run on a
pre-built batch of the same size (input generation and assignment excluded). The ratio
stage ÷ encoder-only is the figure: the kernels should make input generation nearly free.
Both stages also run with the bank left in host memory (``HostRows``, as ``Config
.bank_placement="host"`` does for banks larger than the device): beside the resident bank, the
cost of copying each batch's rows in (nothing on a CPU, where both are one memory).
"""

import pytest
import torch

from fastbd.data.bank import HostRows
from fastbd.detection.flip import flip_counts
from fastbd.poisoncam.masking import candidate_windows

from benchutil import HAS_CUDA, cuda, record_rates, run, stage_setup

SIZES = {
    "cpu": dict(arch="smallconv16", size=32, images=4, masks=64, window=9, test=64, candidates=4,
                batch=256, dtype=torch.float32, device="cpu"),
    "gpu-resnet18": dict(arch="resnet18", size=224, images=8, masks=256, window=60, test=1000,
                         candidates=2, batch=2048, dtype=torch.bfloat16, device="cuda"),
    "gpu-vit_b16": dict(arch="vit_base_patch16_224", size=224, images=4, masks=256, window=60,
                        test=1000, candidates=1, batch=1024, dtype=torch.bfloat16,
                        device="cuda"),
}


STAGES = ["masking", "flip", "encoder_only", "masking-host", "flip-host"]


@pytest.mark.parametrize("stage", STAGES)
def test_poisoncam_stages_cpu(benchmark, stage):
    _bench(benchmark, stage, **SIZES["cpu"])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("model", ["gpu-resnet18", "gpu-vit_b16"])
@pytest.mark.parametrize("stage", STAGES)
def test_poisoncam_stages_gpu(benchmark, model, stage):
    _bench(benchmark, stage, **SIZES[model])


def _bench(benchmark, stage, arch, size, images, masks, window, test, candidates, batch, dtype,
           device):
    encoder, bank, _, encode_assign = stage_setup(arch, size, max(images, test) + 8, dtype,
                                                  device)
    g = torch.Generator().manual_seed(1)
    rows = torch.arange(images, device=device)
    stage, _, placement = stage.partition("-")
    source = HostRows(bank.cpu(), device) if placement == "host" else bank
    if stage == "masking":
        encoded = images * masks
        fn = lambda: candidate_windows(encode_assign, source, rows, encoder.mean, encoder.std,
                                       n_masks=masks, window=window, strategy="full", block=1,
                                       fill=0.0, batch_size=batch, generator=g, dtype=dtype)
    elif stage == "flip":
        encoded = candidates * test
        triggers = bank[:candidates, :, :window, :window].contiguous()
        tests = torch.arange(test, device=device)
        labels, _ = encode_assign(encoder.normalise(bank[:test], dtype))
        fn = lambda: flip_counts(encode_assign, source, tests, labels, triggers, encoder.mean,
                                 encoder.std, candidates_per_batch=candidates, generator=g,
                                 dtype=dtype)
    else:
        encoded = batch
        ready = encoder.normalise(bank[:1].expand(batch, -1, -1, -1), dtype).contiguous()

        def fn():
            with torch.no_grad():
                return encoder(ready)
    run(benchmark, fn, rounds=3, stage=stage, placement=placement or "device", arch=arch,
        size=size, batch=batch, dtype=str(dtype), gpu=HAS_CUDA)
    record_rates(benchmark, images=encoded)
