import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter. The variable must be
# set before anything (timm, torch._inductor) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches live in /tmp across runs, and its FX graph cache does not notice a changed
# op schema (README): a fresh cache per test session, so compiled graphs always call the ops as built now.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cmk_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Every test: fixed seed, and NaN-poisoned kernel outputs so unwritten elements fail."""
    torch.manual_seed(0)
    from convmixer_kernels import _C
    _C.set_poison_outputs(True)
    yield
    _C.set_poison_outputs(False)
