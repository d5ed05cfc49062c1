"""Triton backend: fused depthwise block (dw_block.py) and conv-act-BN (conv_act_bn.py) kernels.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the CI path; no bf16 there).
"""
from __future__ import annotations

# Test hook: when True, every output a launcher allocates is NaN-filled before the kernels run.
POISON_OUTPUTS = False


def make_backend():
    """(KernelBackend, None), or (None, reason) when triton cannot be imported."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return None, f"triton cannot be imported ({type(e).__name__}: {e})"
    from ..backends import KernelBackend
    from .conv_act_bn import conv_act_bn_backward, conv_act_bn_forward
    from .dw_block import dw_block_backward, dw_block_backward_reduce, dw_block_batch_stats, dw_block_forward
    return KernelBackend("triton", ("cuda",), dw_block_forward, dw_block_backward, conv_act_bn_forward,
                         conv_act_bn_backward, dw_block_batch_stats, dw_block_backward_reduce), None
