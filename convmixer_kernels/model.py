"""Fused containers: `FusedSequential` (an nn.Sequential whose conv -> act -> BN runs execute as one
fused op, children and names unchanged) and the fused `ConvMixer` with timm's state_dict keys."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .conv_act_bn import FusedConvActBN, conv_act_bn_modules
from .dw_block import FusedDepthwiseBlock
from .reference import make_act


class FusedSequential(nn.Sequential):
    """An nn.Sequential with a plan: ("fused", i, act) runs children i, i+1, i+2 (conv, act, BN) as
    one fused conv-act-BN op; ("module", i) calls child i as usual. Keys are those of the original."""

    def __init__(self, modules: "OrderedDict[str, nn.Module]", plan: Sequence[tuple], backend: str = "auto"):
        super().__init__(modules)
        self.plan = tuple(plan)
        self.backend = backend

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, plan: Sequence[tuple], backend: str = "auto") -> "FusedSequential":
        new = cls(OrderedDict(seq._modules), plan, backend)
        new.train(seq.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self._modules.values())
        for step in self.plan:
            if step[0] == "fused":
                i, act = step[1], step[2]
                x = conv_act_bn_modules(mods[i], act, mods[i + 2], x, self.backend)
            else:
                x = mods[step[1]](x)
        return x

    def extra_repr(self) -> str:
        fused = [f"{s[1]}-{s[1] + 2}" for s in self.plan if s[0] == "fused"]
        return f"fused=[{', '.join(fused)}], backend={self.backend!r}"


def mixer_layer(dim: int, kernel_size: int, act: str, backend: str) -> FusedSequential:
    """One ConvMixer layer with timm's child names: 0 = depthwise block, 1..3 = pointwise conv, act, BN."""
    mods = OrderedDict([
        ("0", FusedDepthwiseBlock(dim, kernel_size, act, backend=backend)),
        ("1", nn.Conv2d(dim, dim, kernel_size=1)),
        ("2", make_act(act)),
        ("3", nn.BatchNorm2d(dim)),
    ])
    return FusedSequential(mods, [("module", 0), ("fused", 1, act)], backend)


class ConvMixer(nn.Module):
    """ConvMixer-dim/depth with fused blocks. state_dict keys are exactly timm's (``stem.0``, ``stem.2``,
    ``blocks.{i}.0.fn.0``, ``blocks.{i}.0.fn.2``, ``blocks.{i}.1``, ``blocks.{i}.3``, ``head``), so a timm
    checkpoint loads with strict=True."""

    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7, num_classes: int = 1000,
                 act: str = "gelu", backend: str = "auto", in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = dim
        self.stem = FusedConvActBN(in_chans, dim, patch_size, act, backend=backend)
        self.blocks = nn.Sequential(*[mixer_layer(dim, kernel_size, act, backend) for _ in range(depth)])
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.global_pool(self.forward_features(x)), 1))


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Points every fused module in `model` at `backend`."""
    for m in model.modules():
        if isinstance(m, (FusedSequential, FusedConvActBN, FusedDepthwiseBlock)):
            m.backend = backend
    return model
