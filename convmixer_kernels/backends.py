"""Which backends are built, and which one runs a given op.

Every kernel backend exposes the same four launchers (see `KernelBackend`); the op layer
(`_library.py`) routes each op call to one of them by the `backend` string in the op's schema.
"reference" is not a kernel backend: modules asked for it run the plain PyTorch layers.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

ENV_VAR = "CONVMIXER_BACKEND"
ALL_BACKENDS = ("cpu", "triton", "cuda", "cuda_emu", "reference")

# On CUDA tensors "auto" picks the measured winner per op. No GPU measurement exists yet, so every
# op defaults to Triton (benchmarks/gpu_check.sh fills this in; cite the run next to each entry).
CUDA_WINNERS = {
    "dw_block": "triton",
    "conv_act_bn": "triton",
}


# Why a backend's results are not bitwise reproducible from run to run (README "Determinism"); the
# others are, at a fixed thread count (CPU) or on one GPU model (CUDA: fixed-order reductions, no atomics).
NONDETERMINISTIC = {
    "triton": "its autotuner picks tile shapes by timing, and the tile shape sets the summation order of "
              "the per-channel reductions and the GEMMs, so two processes can differ in the last bits",
}


def nondeterminism(name: str) -> Optional[str]:
    """Why backend `name` is not run-to-run reproducible, or None. Triton's interpreter runs one fixed
    config per kernel, so it is reproducible."""
    if name == "triton" and _triton_interpreting():
        return None
    return NONDETERMINISTIC.get(name)


def check_deterministic(name: str, op: str):
    """Under torch.use_deterministic_algorithms(True), a backend that cannot promise reproducible results
    raises as PyTorch's own ops do (or warns, with warn_only=True)."""
    reason = nondeterminism(name)
    if reason is None or not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"convmixer_kernels: {op} with backend {name!r} does not have a deterministic implementation "
           f"({reason}), but you set 'torch.use_deterministic_algorithms(True)'. Use backend='cuda' (which "
           f"backend='auto' then picks), or torch.use_deterministic_algorithms(True, warn_only=True)")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg)
    else:
        raise RuntimeError(msg)


@dataclass
class KernelBackend:
    name: str
    devices: tuple  # device types whose tensors it accepts
    dw_block_forward: Callable
    dw_block_backward: Callable
    conv_act_bn_forward: Callable
    conv_act_bn_backward: Callable
    dw_block_batch_stats: Callable      # synchronized BN: forward statistics pass only
    dw_block_backward_reduce: Callable  # synchronized BN: backward reduction pass only


_LOADED: dict = {}
_REASONS: dict = {}


def _extension():
    try:
        return importlib.import_module("convmixer_kernels._C"), None
    except ImportError as e:  # not built
        return None, f"the C++ extension convmixer_kernels._C is not built ({e})"


def _load(name: str) -> Optional[KernelBackend]:
    if name in _LOADED or name in _REASONS:
        return _LOADED.get(name)
    backend, reason = None, None
    if name == "cpu":
        ext, reason = _extension()
        if ext is not None:
            backend = KernelBackend("cpu", ("cpu",), ext.dw_block_forward_cpu, ext.dw_block_backward_cpu,
                                    ext.conv_act_bn_forward_cpu, ext.conv_act_bn_backward_cpu,
                                    ext.dw_block_batch_stats_cpu, ext.dw_block_backward_reduce_cpu)
    elif name == "triton":
        try:
            from . import triton as triton_backend  # noqa: F401  (imports triton)
            backend, reason = triton_backend.make_backend()
        except ImportError as e:
            reason = f"triton backend unavailable: {e}"
    elif name in ("cuda", "cuda_emu"):
        ext, reason = _extension()
        if ext is not None:
            prefix = "cuda" if name == "cuda" else "cuda_emu"
            if not hasattr(ext, f"dw_block_forward_{prefix}"):
                reason = (f"the {name} kernels are not in this build "
                          + ("(built without a CUDA toolkit; set CONVMIXER_BUILD_CUDA=1 and rebuild)"
                             if name == "cuda" else "(the CUDA emulation harness is not built)"))
            else:
                dev = ("cuda",) if name == "cuda" else ("cpu",)
                backend = KernelBackend(name, dev, *(getattr(ext, f"{op}_{prefix}") for op in (
                    "dw_block_forward", "dw_block_backward", "conv_act_bn_forward", "conv_act_bn_backward",
                    "dw_block_batch_stats", "dw_block_backward_reduce")))
                if name == "cuda" and not torch.cuda.is_available():
                    backend, reason = None, "built, but no CUDA device is visible"
    if backend is None:
        _REASONS[name] = reason or "unavailable"
    else:
        _LOADED[name] = backend
    return backend


def get_backend(name: str) -> KernelBackend:
    b = _load(name)
    if b is None:
        raise RuntimeError(f"convmixer_kernels: backend {name!r} is not available: {_REASONS[name]}")
    return b


def available_backends() -> dict:
    """{name: (available, reason)} for every backend this package knows."""
    out = {}
    for name in ALL_BACKENDS:
        if name == "reference":
            out[name] = (True, "plain PyTorch layers (unfused), always available")
            continue
        b = _load(name)
        why = "built" if b is not None else _REASONS[name]
        if name == "cpu" and b is not None:
            ext = importlib.import_module("convmixer_kernels._C")
            why += f"; {ext.cpu_vector_bytes()}-byte vectors; GEMMs: " + ext.cpu_gemm_library()
        out[name] = (b is not None, why)
    return out


def resolve(requested: str, device: torch.device, op: str) -> str:
    """The backend that runs `op` on tensors of `device`. The environment variable wins over the
    requested name; "auto" picks the best built backend for the device. Never falls back silently:
    an explicitly named backend that cannot run raises."""
    name = os.environ.get(ENV_VAR) or requested
    if name not in ALL_BACKENDS + ("auto",):
        raise ValueError(f"convmixer_kernels: unknown backend {name!r}; expected 'auto' or one of {ALL_BACKENDS}")
    if name == "auto":
        if device.type == "cpu":
            name = "cpu"
        elif device.type == "cuda":
            name = CUDA_WINNERS[op]
            if nondeterminism(name) and torch.are_deterministic_algorithms_enabled() and _load("cuda") is not None:
                name = "cuda"
            if _load(name) is None:
                other = "cuda" if name == "triton" else "triton"
                if _load(other) is None:
                    raise RuntimeError(f"convmixer_kernels: no GPU backend is available for {op}: "
                                       f"triton: {_REASONS['triton']}; cuda: {_REASONS['cuda']}")
                name = other
        else:
            raise RuntimeError(f"convmixer_kernels: no backend for device type {device.type!r}")
    if name == "reference":
        return name
    b = get_backend(name)
    if device.type not in b.devices and not (name == "triton" and _triton_interpreting() and device.type == "cpu"):
        raise RuntimeError(f"convmixer_kernels: backend {name!r} cannot run on {device.type} tensors "
                           f"(it takes {', '.join(b.devices)} tensors)")
    check_deterministic(name, op)
    return name


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
