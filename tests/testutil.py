"""Device parameters shared by the op tests; the detector tests' normalisation and colour."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# (device, backend) pairs every op test runs: the CPU reference, Triton under the interpreter,
# and on a GPU the CUDA backends.
CPU_BACKENDS = [("cpu", "torch"), ("cpu", "triton")]
CUDA_BACKENDS = [pytest.param("cuda", b, marks=[pytest.mark.cuda, cuda], id=f"cuda-{b}")
                 for b in ("torch", "triton")]

# The detector tests' encoder normalisation and their magenta trigger colour.
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
MAGENTA = torch.tensor([255, 0, 255], dtype=torch.uint8)

