"""Ground truth: the paper's ConvMixer and plain-PyTorch versions of every fused block.

Nothing here calls the fused code. The block functions work in any dtype; tests and the verifier run
them in float64 on the CPU (DESIGN.md section 4).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


def make_act(act: str) -> nn.Module:
    if act == "gelu":
        return nn.GELU()
    if act == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if act == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def act_fn(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


# --- The paper's model, exactly as published (with a selectable activation) -----------------------

class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def ConvMixerPaper(dim, depth, kernel_size=9, patch_size=7, n_classes=1000, act="gelu"):
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
        make_act(act),
        nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                make_act(act),
                nn.BatchNorm2d(dim),
            )),
            nn.Conv2d(dim, dim, kernel_size=1),
            make_act(act),
            nn.BatchNorm2d(dim),
        ) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, n_classes),
    )


# --- Block functions ------------------------------------------------------------------------------

def batch_norm(g, gamma, beta, running_mean, running_var, num_batches_tracked, training, momentum, eps):
    """nn.BatchNorm2d.forward as a function (updates the running stats in place like it does)."""
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    else:
        factor = 0.0 if momentum is None else momentum
    use_batch = training or running_mean is None
    return F.batch_norm(g, running_mean, running_var, gamma, beta, use_batch, factor, eps)


def same_padding(k: int) -> tuple[int, int]:
    """PyTorch's padding='same' for stride 1: left/top (k-1)//2, right/bottom the rest."""
    left = (k - 1) // 2
    return left, k - 1 - left


def dw_block_reference(x, weight, bias, gamma, beta, running_mean=None, running_var=None,
                       num_batches_tracked=None, training=True, momentum=0.1, eps=1e-5, act="gelu"):
    """x + BN(act(DWConv_k(x) + b)), same padding, cross-correlation."""
    k = weight.shape[-1]
    pl, pr = same_padding(k)
    t = F.conv2d(F.pad(x, (pl, pr, pl, pr)), weight, bias, groups=x.shape[1])
    g = act_fn(t, act)
    return x + batch_norm(g, gamma, beta, running_mean, running_var, num_batches_tracked, training, momentum, eps)


def patch_conv(x, weight, bias, patch):
    """F.conv2d(x, weight, bias, stride=patch) for a patch x patch kernel, as the matmul it is: each output
    pixel is one non-overlapping patch (cin*p*p values, trailing rows/columns dropped) dotted with a filter.
    Not F.conv2d itself: PyTorch 2.14.1's CPU bf16 convolution returns uninitialized memory for cin = 3,
    kernel = stride = 2 and one output column (NaN or garbage, varying run to run; found by the fuzz,
    tests/test_fuzz.py), and the same-dtype PyTorch run is the yardstick of the numerics rule."""
    N, cin, H, W = x.shape
    Ho, Wo = H // patch, W // patch
    patches = (x[:, :, :Ho * patch, :Wo * patch].reshape(N, cin, Ho, patch, Wo, patch)
               .permute(0, 2, 4, 1, 3, 5).reshape(N, Ho, Wo, cin * patch * patch))
    t = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)  # (N, Ho, Wo, C)
    return t.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last if x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format)


def conv_act_bn_reference(x, weight, bias, gamma, beta, running_mean=None, running_var=None,
                          num_batches_tracked=None, training=True, momentum=0.1, eps=1e-5, act="gelu", patch=1):
    """BN(act(Conv(x, kernel=patch, stride=patch) + b)): the pointwise block (patch=1) or the stem."""
    t = F.conv2d(x, weight, bias) if patch == 1 else patch_conv(x, weight, bias, patch)
    g = act_fn(t, act)
    return batch_norm(g, gamma, beta, running_mean, running_var, num_batches_tracked, training, momentum, eps)
