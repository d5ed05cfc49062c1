"""The runtimes CPU users pick for inference, as benchmark variants (issue 12): ONNX Runtime, OpenVINO and
torch.compile with inductor's freezing, each built from the unfused eager model and run at the thread count
of the run (torch.get_num_threads()).

  onnxruntime             CPU execution provider, ORT_ENABLE_ALL graph optimizations, intra-op threads =
                          the run's, inter-op 1; from an ONNX export (opset 17, TorchScript exporter) of the
                          fp32 eager model. fp32 in every row: its CPU provider has no bf16 convolutions.
  openvino                CPU plugin, PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS = the run's, from the same
                          ONNX export; INFERENCE_PRECISION_HINT f32 in fp32 rows and bf16 in bf16 rows (its own
                          bf16 path on AVX512_BF16/AMX CPUs; fp32 in and out).
  torch_compile_freezing  torch.compile (inductor) with torch._inductor.config.freezing = True while it compiles
                          (weights folded as constants, oneDNN's prepacked convolutions): the eager model in the
                          row's dtype.

Inference only: these are eval variants. ONNX Runtime and OpenVINO take and return numpy arrays; the time of
one call includes converting the input to numpy (a view: no copy) and is measured like every other variant.
A missing package makes the variant "skipped: <package> not installed".
"""
from __future__ import annotations

import copy
import io
import warnings
from typing import Callable

import torch
import torch.nn as nn

PEERS = ("torch_compile_freezing", "onnxruntime", "openvino")


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (its package is missing); the benchmark reports the reason as skipped."""


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise PeerUnavailable(f"{name} not installed (pip install -r requirements.txt)") from e


def onnx_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    """The ONNX export of an fp32 eval model (the TorchScript exporter: no onnxscript dependency)."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17)
    return f.getvalue()


def _fp32_eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).float().eval()


def build_peer(name: str, model: nn.Module, x: torch.Tensor, threads: int,
               compile_backend: str = "inductor") -> Callable[[], object]:
    """fn() running one inference of `model` on `x` in peer `name` (one of PEERS); PeerUnavailable when its
    package is missing. The model is not changed (every peer works on a copy)."""
    if x.device.type != "cpu":
        raise PeerUnavailable("CPU runtimes: the input is not on the CPU")
    if name == "torch_compile_freezing":
        import torch._inductor.config as inductor_config
        m = copy.deepcopy(model).eval()
        cm = torch.compile(m, backend=compile_backend)
        old = inductor_config.freezing
        inductor_config.freezing = True  # read when the graph compiles: the first call
        try:
            with torch.no_grad():
                cm(x)
        finally:
            inductor_config.freezing = old
        return lambda: cm(x)
    bf16 = x.dtype == torch.bfloat16
    if name == "onnxruntime":
        ort = _import("onnxruntime")
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        xf = x.float()
        sess = ort.InferenceSession(onnx_bytes(_fp32_eval_copy(model), xf), so, providers=["CPUExecutionProvider"])
        in_name = sess.get_inputs()[0].name
        return lambda: sess.run(None, {in_name: xf.numpy()})
    if name == "openvino":
        ov = _import("openvino")
        xf = x.float()
        core = ov.Core()
        compiled = core.compile_model(core.read_model(onnx_bytes(_fp32_eval_copy(model), xf), b""), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"})
        return lambda: compiled(xf.numpy())
    raise ValueError(f"unknown CPU peer {name!r} (expected one of {', '.join(PEERS)})")


def peer_output(out) -> torch.Tensor:
    """The first output of a peer call as an fp32 torch tensor: a tensor (torch.compile), a list of arrays
    (ONNX Runtime) or an OVDict indexed by output number (OpenVINO)."""
    if isinstance(out, torch.Tensor):
        return out.float()
    import numpy as np
    return torch.from_numpy(np.asarray(out[0])).float()


def peer_note(name: str, dtype: torch.dtype) -> str:
    if name == "onnxruntime" and dtype != torch.float32:
        return "runs fp32 (its CPU provider has no bf16 convolutions)"
    if name == "openvino" and dtype == torch.bfloat16:
        return "INFERENCE_PRECISION_HINT bf16, fp32 in/out"
    if name == "openvino" and dtype != torch.float32:
        return "runs fp32"
    return ""
