"""Converter: finds the ConvMixer patterns anywhere in a module tree and swaps in fused modules that
hold the very same submodules, so every parameter and buffer keeps its name and value.

Patterns:
  * a ``Residual`` (``.fn`` = Sequential(depthwise Conv2d, act, BatchNorm2d), forward fn(x) + x), as in
    the paper's code and timm: becomes a FusedDepthwiseBlock around the same ``fn``;
  * a run Conv2d(kernel = stride = p, no padding) -> act -> BatchNorm2d inside an nn.Sequential (the
    pointwise conv and the stem): the Sequential becomes a FusedSequential with the same children.
Anything that looks like a pattern but cannot be fused exactly is left alone and reported.

Cross-layer fusion: a Sequential whose children chain a conv-act-BN into a fused depthwise block
(the paper's flat model; timm's ``blocks``) becomes a FusedSequential too, so the pointwise BN apply
runs inside the next depthwise block's load. Not across a parent's own forward: timm's ConvMixer
calls ``stem`` and ``blocks`` separately, so its stem still writes its normalized output.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch.nn as nn

from .conv_act_bn import FusedConvActBN
from .dw_block import FusedDepthwiseBlock
from .sync_bn import SyncBatchNorm2d
from .model import FusedSequential, accepts_pending, emits_pending, fused_batchnorms, set_sync_bn


@dataclass
class ConversionReport:
    fused: List[Tuple[str, str]] = field(default_factory=list)    # (module path, what was fused)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (module path, why not)

    def __str__(self):
        lines = [f"fused {len(self.fused)} block(s), left {len(self.skipped)} as they are"]
        lines += [f"  fused   {p or '<root>'}: {w}" for p, w in self.fused]
        lines += [f"  skipped {p or '<root>'}: {w}" for p, w in self.skipped]
        return "\n".join(lines)


def activation_name(m: nn.Module) -> Optional[str]:
    if type(m) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    if type(m) is nn.ReLU:
        return "relu"
    return None


def _check_bn(bn: nn.Module, channels: int) -> Optional[str]:
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm2d):
        return f"{type(bn).__name__} is not nn.BatchNorm2d (or nn.SyncBatchNorm)"
    if bn.num_features != channels:
        return f"BatchNorm2d has {bn.num_features} features but the conv has {channels} output channels"
    return None


def depthwise_problem(fn: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(reason it cannot be fused or None, activation name)."""
    if not isinstance(fn, nn.Sequential) or len(fn) != 3:
        return "fn is not a 3-module Sequential (conv, act, BatchNorm2d)", None
    conv, act_m, bn = fn[0], fn[1], fn[2]
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not nn.Conv2d", None
    c = conv.in_channels
    k = conv.kernel_size
    if conv.out_channels != c or conv.groups != c:
        return (f"not depthwise: groups={conv.groups}, in_channels={c}, out_channels={conv.out_channels}"), None
    if k[0] != k[1]:
        return f"non-square kernel {k}", None
    if conv.stride != (1, 1):
        return f"stride {conv.stride} (only 1 is fused)", None
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation} (only 1 is fused)", None
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (only zeros is fused)", None
    same = conv.padding == "same" or (k[0] % 2 == 1 and conv.padding == ((k[0] - 1) // 2,) * 2)
    if not same:
        return f"padding {conv.padding!r} is not 'same'", None
    problem = _check_bn(bn, c)
    if problem:
        return problem, None
    act = activation_name(act_m)
    if act is None:
        return f"unsupported activation {act_m!r} (gelu, gelu tanh, relu)", None
    return None, act


def patch_conv_problem(conv: nn.Conv2d, act_m: nn.Module, bn: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    k, s = conv.kernel_size, conv.stride
    if k[0] != k[1] or s != k:
        return f"kernel {k} with stride {s} (fused only when kernel = stride, square)", None
    if conv.groups != 1:
        return f"groups={conv.groups} (only 1 is fused)", None
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}", None
    if conv.padding not in ((0, 0), "valid"):
        return f"padding {conv.padding!r} (only 0 is fused)", None
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}", None
    problem = _check_bn(bn, conv.out_channels)
    if problem:
        return problem, None
    act = activation_name(act_m)
    if act is None:
        return f"unsupported activation {act_m!r} (gelu, gelu tanh, relu)", None
    return None, act


def is_residual(m: nn.Module) -> bool:
    return type(m).__name__ == "Residual" and isinstance(getattr(m, "fn", None), nn.Module)


def _recast(module: nn.Module, cls: type, **attrs) -> nn.Module:
    """Turns `module` into a `cls` in place: the same object keeps its children, parameters, buffers,
    hooks and train/eval mode (so inplace=True returns the very model it was given); only the
    forward changes. `cls` is a subclass of the module's own container kind with the same children."""
    module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


class _Converter:
    def __init__(self, backend: str, cross_layer: bool, cpu_channels_last: bool):
        self.backend = backend
        self.cross_layer = cross_layer
        self.cpu_channels_last = cpu_channels_last
        self.report = ConversionReport()

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, (FusedDepthwiseBlock, FusedConvActBN, FusedSequential)):
            return module
        if is_residual(module):
            problem, act = depthwise_problem(module.fn)
            if problem is None:
                new = _recast(module, FusedDepthwiseBlock, act=act, backend=self.backend)
                self.report.fused.append((path, f"depthwise block k={module.fn[0].kernel_size[0]}, {act}"))
                return new
            self.report.skipped.append((path, problem))
            return module
        for name, child in list(module.named_children()):
            new = self.convert(child, f"{path}.{name}" if path else name)
            if new is not child:
                module._modules[name] = new
        if isinstance(module, nn.Sequential):
            return self._convert_sequential(module, path)
        return module

    def _convert_sequential(self, seq: nn.Sequential, path: str) -> nn.Module:
        mods = list(seq._modules.values())
        names = list(seq._modules.keys())
        plan, i = [], 0
        while i < len(mods):
            if (i + 2 < len(mods) and type(mods[i]) is nn.Conv2d and isinstance(mods[i + 2], nn.modules.batchnorm._BatchNorm)):
                problem, act = patch_conv_problem(mods[i], mods[i + 1], mods[i + 2])
                where = f"{path}.{names[i]}" if path else names[i]
                if problem is None:
                    plan.append(("fused", i, act))
                    p = mods[i].kernel_size[0]
                    self.report.fused.append((where, f"conv {p}x{p}/{p} -> {act} -> BatchNorm2d"))
                    i += 3
                    continue
                self.report.skipped.append((where, problem))
            plan.append(("module", i))
            i += 1
        chains = self.cross_layer and any(emits_pending(a) and accepts_pending(b) for a, b in zip(mods, mods[1:]))
        if not chains and not any(step[0] == "fused" for step in plan):
            return seq
        # A patch-embedding stem first (stride > 1): the layers after it run channels_last on the CPU.
        stem_first = plan[0][0] == "fused" and mods[plan[0][1]].stride[0] > 1
        layout = dict(channels_last_cpu=True) if stem_first and self.cpu_channels_last else {}
        if len(mods) == 3 and len(plan) == 1 and plan[0][0] == "fused":
            return _recast(seq, FusedConvActBN, act=plan[0][2], backend=self.backend, **layout)
        return _recast(seq, FusedSequential, plan=tuple(plan), backend=self.backend, cross_layer=self.cross_layer,
                       **layout)


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False, return_report: bool = False,
            cross_layer: bool = True, sync_bn: bool = False, process_group=None, cpu_channels_last: bool = True):
    """Swaps fused modules into `model` (a copy unless inplace=True). Keeps every parameter and buffer
    name and value, and the train/eval mode. Returns the model, or (model, ConversionReport) when
    return_report is true; unfusable look-alikes are also reported with a warning. cross_layer=False
    keeps every BN apply in its own block (no PendingBN handed between blocks). sync_bn=True makes the
    fused modules' BatchNorms synchronized over `process_group` (see `set_sync_bn`); a model whose BNs are
    already nn.SyncBatchNorm (timm's --sync-bn) converts as is and syncs over their groups.
    cpu_channels_last=True: a fused patch-embedding stem makes a CPU input channels_last, so the blocks
    after it run in the kernels' fast layout (the logits are the same; feature maps come out channels_last)."""
    if not inplace:
        model = copy.deepcopy(model)
    conv = _Converter(backend, cross_layer, cpu_channels_last)
    new = conv.convert(model, "")
    if sync_bn:
        set_sync_bn(new, process_group)
    else:  # nn.SyncBatchNorm layers (timm's --sync-bn) keep syncing over their groups, and DDP accepts them on CPU
        for bn in fused_batchnorms(new):
            if isinstance(bn, nn.SyncBatchNorm):
                SyncBatchNorm2d.adopt(bn)
    if conv.report.skipped:
        warnings.warn("convmixer_kernels.convert left these modules unfused:\n"
                      + "\n".join(f"  {p or '<root>'}: {w}" for p, w in conv.report.skipped), stacklevel=2)
    return (new, conv.report) if return_report else new
