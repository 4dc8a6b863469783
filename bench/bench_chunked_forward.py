"""A CPU encoder forward of a flip-test batch (16 candidates × 150 test images, 32 px,
``smallconv16``): fastbd's ``Encoder`` (chunks whose largest activation stays under
``CPU_CHUNK_BYTES``) vs the plain way (the whole batch through the backbone at once), with the
minor page faults of each — what glibc's allocator costs when every batch's activations are
fresh pages (``fastbd.devices.keep_cpu_heap``)."""

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastbd.models import encoder_by_name

from benchutil import run

BATCH, SIZE = 2400, 32


def setup():
    encoder = encoder_by_name("smallconv16", image_size=SIZE).eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return encoder, x


@pytest.mark.parametrize("impl", ["fastbd", "whole_batch"])
def test_chunked_forward_cpu(benchmark, impl):
    encoder, x = setup()
    forward = encoder if impl == "fastbd" else encoder.backbone
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        out = run(benchmark, lambda: forward(x), impl=impl, images=BATCH, size=SIZE,
                  rows_per_forward=encoder.cpu_chunk_rows(x) if impl == "fastbd" else BATCH)
    benchmark.extra_info["minor_faults"] = resource.getrusage(
        resource.RUSAGE_SELF).ru_minflt - faults
    assert out.shape == (BATCH, encoder.feature_dim)


MEASURE = textwrap.dedent("""
    import json, resource, sys, time, torch
    sys.path.insert(0, sys.argv[1])
    from bench_chunked_forward import setup
    from fastbd.devices import keep_cpu_heap
    assert keep_cpu_heap()  # as the fastbd command does
    torch.set_num_threads(1)
    encoder, x = setup()
    results = {}
    with torch.no_grad():
        for name, forward in (("fastbd", encoder), ("whole_batch", encoder.backbone)):
            forward(x)  # warm: the allocator's thresholds settle
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu = time.process_time()
            outputs = [forward(x) for _ in range(4)]
            results[name] = {
                "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                "cpu_s": time.process_time() - cpu,
                "max_diff": float((outputs[0][:64] - encoder.backbone(x[:64])).abs().max()
                                  if name == "fastbd" else 0.0)}
    print(json.dumps(results))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_chunked_forwards_reuse_the_heap_instead_of_faulting_in_fresh_pages():
    """In a fresh process with the heap kept (as the ``fastbd`` command runs), four warm
    forwards of a flip-test batch: the whole batch at once faults its activations' pages in
    every time; fastbd's chunks reuse the heap (a regression to batch-sized activations, or a
    heap that is given back, fails this), with the same features."""
    job = subprocess.run([sys.executable, "-c", MEASURE, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert job.returncode == 0, job.stderr[-2000:]
    results = json.loads(job.stdout.splitlines()[-1])
    whole, chunked = results["whole_batch"]["faults"], results["fastbd"]["faults"]
    assert whole > 10_000, results  # the plain way does fault: the measurement sees it
    assert chunked * 20 < whole, results
    assert results["fastbd"]["max_diff"] < 1e-4, results

