import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter. The variable must be
# set before anything (timm, torch._inductor) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Every test: fixed seed, and NaN-poisoned kernel outputs so unwritten elements fail."""
    torch.manual_seed(0)
    from convmixer_kernels import _C
    _C.set_poison_outputs(True)
    yield
    _C.set_poison_outputs(False)
