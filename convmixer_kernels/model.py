"""Fused containers: `FusedSequential` (an nn.Sequential whose conv -> act -> BN runs execute as one
fused op, children and names unchanged) and the fused `ConvMixer` with timm's state_dict keys."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ._library import PendingBN, model_layout
from .sync_bn import SyncBatchNorm2d
from .conv_act_bn import FusedConvActBN, conv_act_bn_modules
from .dw_block import FusedDepthwiseBlock
from .reference import make_act


def accepts_pending(m: nn.Module) -> bool:
    """Whether `m` can take a PendingBN input (apply the previous block's BN on its load)."""
    if isinstance(m, FusedDepthwiseBlock):
        return True
    if isinstance(m, FusedSequential) and m.plan and m.plan[0][0] == "module":
        return accepts_pending(m[m.plan[0][1]])
    return False


def emits_pending(m: nn.Module) -> bool:
    """Whether `m` ends in a conv-act-BN that can hand its BN apply to the next block."""
    if isinstance(m, FusedConvActBN):
        return True
    if isinstance(m, FusedSequential) and m.plan:
        last = m.plan[-1]
        return last[0] == "fused" or emits_pending(m[last[1]])
    return False


def _materialize(x):
    return x.materialize() if isinstance(x, PendingBN) else x


class FusedSequential(nn.Sequential):
    """An nn.Sequential with a plan: ("fused", i, act) runs children i, i+1, i+2 (conv, act, BN) as
    one fused conv-act-BN op; ("module", i) calls child i as usual. Keys are those of the original.

    Cross-layer fusion (DESIGN.md section 3): when a conv-act-BN step is followed by a step that
    accepts it (a fused depthwise block, directly or as the first step of a nested FusedSequential),
    the BN apply is not run; the step hands on a PendingBN and the depthwise block applies it on its
    load. `cross_layer=False` turns this off (each block then writes its own normalized output).
    channels_last_cpu (set by the converter when the first step is a patch-embedding stem): a CPU input
    is first made channels_last, the kernels' fast layout, as FusedConvActBN's."""

    channels_last_cpu = False

    def __init__(self, modules: "OrderedDict[str, nn.Module]", plan: Sequence[tuple], backend: str = "auto",
                 cross_layer: bool = True):
        super().__init__(modules)
        self.plan = tuple(plan)
        self.backend = backend
        self.cross_layer = cross_layer

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, plan: Sequence[tuple], backend: str = "auto") -> "FusedSequential":
        new = cls(OrderedDict(seq._modules), plan, backend)
        new.train(seq.training)
        return new

    def forward(self, x: Union[torch.Tensor, PendingBN], defer_out: bool = False) -> Union[torch.Tensor, PendingBN]:
        """Runs the plan. `x` may be a PendingBN when the first step accepts one; with defer_out=True
        the result may be a PendingBN (when the last step can emit one)."""
        mods = list(self._modules.values())
        cross = getattr(self, "cross_layer", True)
        if isinstance(x, torch.Tensor):
            x = model_layout(x, self.channels_last_cpu)
        for j, step in enumerate(self.plan):
            if j + 1 < len(self.plan):
                nxt = self.plan[j + 1]
                defer = cross and nxt[0] == "module" and accepts_pending(mods[nxt[1]])
            else:
                defer = defer_out
            if step[0] == "fused":
                i, act = step[1], step[2]
                x = conv_act_bn_modules(mods[i], act, mods[i + 2], _materialize(x), self.backend, defer_bn=defer)
                continue
            m = mods[step[1]]
            if isinstance(m, FusedSequential):
                x = m(x, defer_out=defer)
            elif isinstance(m, FusedConvActBN):
                x = m(_materialize(x), defer_bn=defer)
            elif isinstance(m, FusedDepthwiseBlock):
                x = m(x)
            else:
                x = m(_materialize(x))
        return x

    def extra_repr(self) -> str:
        fused = [f"{s[1]}-{s[1] + 2}" for s in self.plan if s[0] == "fused"]
        cross = getattr(self, "cross_layer", True)
        return f"fused=[{', '.join(fused)}], cross_layer={cross}, backend={self.backend!r}"


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
                 act: str = "gelu", backend: str = "auto", in_chans: int = 3, sync_bn: bool = False,
                 process_group=None):
        """sync_bn=True: every BN computes its training statistics over the global batch of
        `process_group` (None: the default group), fused; see `set_sync_bn`."""
        super().__init__()
        self.num_classes = num_classes
        self.num_features = dim
        self.stem = FusedConvActBN(in_chans, dim, patch_size, act, backend=backend)
        self.stem.channels_last_cpu = True  # the blocks run channels_last on the CPU, whatever the input's layout
        layers = OrderedDict((str(i), mixer_layer(dim, kernel_size, act, backend)) for i in range(depth))
        self.blocks = FusedSequential(layers, [("module", i) for i in range(depth)], backend)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if sync_bn:
            set_sync_bn(self, process_group)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # The stem's BN and every pointwise BN but the last are applied by the next depthwise block.
        cross = self.blocks.cross_layer and len(self.blocks) > 0
        return self.blocks(self.stem(x, defer_bn=cross))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.global_pool(self.forward_features(x)), 1))


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Points every fused module in `model` at `backend`."""
    for m in model.modules():
        if isinstance(m, (FusedSequential, FusedConvActBN, FusedDepthwiseBlock)):
            m.backend = backend
    return model


def set_cross_layer(model: nn.Module, enabled: bool) -> nn.Module:
    """Turns the cross-layer fusion (pointwise BN applied by the next depthwise block) on or off."""
    for m in model.modules():
        if isinstance(m, FusedSequential):
            m.cross_layer = enabled
    return model


def set_sync_bn(model: nn.Module, process_group=None) -> nn.Module:
    """Makes every BatchNorm that a fused module runs a SyncBatchNorm2d over `process_group` (None: the
    default group) in place: the same parameters and buffers, so state_dict keys do not change. The fused
    ops then compute global batch statistics (sync_bn.py), with DDP on CPU (gloo) or GPU (NCCL).
    BatchNorms outside fused modules are left alone. (A fused module whose BN child is an nn.SyncBatchNorm,
    e.g. after nn.SyncBatchNorm.convert_sync_batchnorm, syncs over that layer's group too; DDP accepts
    nn.SyncBatchNorm on GPU modules only.)"""
    for bn in fused_batchnorms(model):
        SyncBatchNorm2d.adopt(bn, process_group)
    return model


def fused_batchnorms(model: nn.Module):
    """The BatchNorm modules that fused modules in `model` run."""
    for m in model.modules():
        if isinstance(m, FusedDepthwiseBlock):
            yield m.fn[2]
        elif isinstance(m, FusedConvActBN):
            yield m[2]
        elif isinstance(m, FusedSequential):
            mods = list(m._modules.values())
            yield from (mods[step[1] + 2] for step in m.plan if step[0] == "fused")
