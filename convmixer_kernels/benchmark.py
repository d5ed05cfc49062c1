"""The benchmark harness, one for the CPU and the GPU: every fused op, a mixer layer and whole models, each
fused backend against eager NCHW, eager channels_last and torch.compile, timed in one process and
interleaved (each repetition, or round, runs every variant once, in turn), reported as medians and
ratios, with the bytes each variant saves for the backward and the fraction of a roofline floor built from
ceilings measured in the same run.

    python -m convmixer_kernels bench [--cases dw,pw,stem,layer,model] [--shapes ...] [--modes ...]
                                      [--backends cpu] [--dtypes fp32] [--reps N] [--out DIR] [--tiny]
    python -m convmixer_kernels bench --no-verify --out DIR [--budget-s 200] [--tune 2]  # on a GPU
    python -m convmixer_kernels bench --dry-run --no-verify  # CPU, tiny shapes: checks the GPU code path

Profiles: the device picks the defaults; every one can be set by its option.
                 CPU (--device cpu)                  CUDA (--device cuda; --dry-run: the same on the CPU)
  --cases        dw,pw,stem,layer,model,model768     dw,pw,layer
  --shapes       cpu                                 1536/20,768/32
  --dtypes       fp32,bf16 (bf16: eval rows only,    bf16,fp16
                 unless --dtypes or --modes is given)
  --modes        all four for dw/pw/stem,            eval,train
                 eval,train for the layer and models
  --peers        torch_compile_freezing,onnxruntime, none (they are CPU runtimes)
                 openvino, in the eval rows
  --timer        call, --reps 7, --warmup 2          do_bench, --reps 2 rounds, --warmup 1
  torch.compile  default mode, in process, every     default and max-autotune, each in a child process
                 case and mode                       (--subprocess-variants) under --compile-timeout-s, on
                                                     the target rows only (--compile-rows targets)
  --dry-run is --device cpu --tiny with the CUDA profile (fused_cpu stands in for the GPU backends); it
  leaves out the torch.compile variants (inductor's C++ compile takes minutes on 2 cores) unless
  --compile-modes is given. The run on a GPU: benchmarks/gpu_check.sh.

Cases
  op     dw      the depthwise block x + BN(act(DWConv_k(x)))
         pw      the pointwise block BN(act(Conv1x1(x)))
         stem    the patch stem BN(act(Conv_p,stride p(img)))
  layer  layer   one mixer layer (dw then pw)
  model  model   ConvMixer-256/8 (k=9, p=2) on 32 px CIFAR-size images
         model768, model1536   ConvMixer-768/32 (k=7, p=7, ReLU) and ConvMixer-1536/20 (k=9, p=7, GELU) at
                 224 px (on the CPU at batch 2)
  Block shapes (--shapes; the block cases run once per shape; --op-shape N,C,H,W, --kernel-size, --patch
  and --act override every shape's values):
    cpu       32 x 256 x 16 x 16, k=9, GELU (the stem: 32x3x32x32, p=2)  -- the shapes of issue #2
    1536/20   --gpu-batch (64) x 1536 x 32 x 32, k=9, GELU: ConvMixer-1536/20's layer (the stem: 224 px, p=7)
    768/32    --gpu-batch (64) x 768 x 32 x 32, k=7, ReLU: ConvMixer-768/32's layer
  ConvMixer-256/8 at batch 64 on the CPU; on CUDA every model at batch --gpu-batch. --tiny: tiny shapes
  everywhere (checks the code path, fast). Target rows (run first, so a budget cut keeps them; the only
  rows with torch.compile under --compile-rows targets): the depthwise block at 1536/20 bf16 eval, and
  the mixer layer at 1536/20 bf16 train.

Modes
  eval       forward in eval mode under torch.no_grad()
  train      one training step: forward in training mode + y.backward(dy), timed together
  train_fwd  training-mode forward with autograd recording (the graph and saved tensors are built;
             the output is held until the clock stops, then dropped)
  train_bwd  the backward alone: before every timed call a fresh training forward runs *untimed*
             (gradients cleared, then y = model(x)), the device is synchronized, and only
             y.backward(dy) is timed. A new graph per call (rather than backward(retain_graph=True) on
             one graph) keeps the measurement honest for every variant: nothing accumulates into .grad
             (an extra add per gradient), custom ops and torch.compile's compiled backward run exactly
             as in training, and the saved tensors are fresh.
  dy is one fixed random tensor per case (in the output's memory format). The blocks' input requires
  grad in training modes (inside a network, dx is needed); the stem's and the models' input (images)
  does not. Training rows backpropagate dy into x (where it requires grad) and every parameter, gradients
  set to None before each call. BatchNorm parameters and running statistics stay fp32 (the AMP
  convention the fused ops require); the conv weights and activations are in the benchmark dtype.

Variants (interleaved)
  eager_nchw, eager_channels_last, torch_compile (mode default, NCHW input),
  torch_compile_max_autotune (mode "max-autotune", NCHW; --compile-modes),
  the CPU peers (--peers; eval rows only; convmixer_kernels/cpu_peers.py): torch_compile_freezing
  (inductor with freezing = True), onnxruntime (CPU EP, all graph optimizations) and openvino (CPU,
  LATENCY hint), the last two from an ONNX export of the fp32 eager model, at the run's thread count;
  in bf16 rows OpenVINO runs its bf16 precision hint and ONNX Runtime stays fp32 (CSV note); a missing
  package makes the row "skipped: <package> not installed"; every peer's largest deviation from the
  eager output is in its note, and one that differs by over 5% of max |y| is an error, not a time,
  fused_<backend> for each of --backends (default: every kernel backend built for the device: on the
  CPU "cpu", on CUDA "triton" and "cuda"), channels_last; --fused-layouts nchw,channels_last adds
  fused_<backend>_nchw. --variants keeps only the named ones. Triton on the CPU (its interpreter: very
  slow, --tiny) only when named in --backends and TRITON_INTERPRET=1 is set before the start. A variant
  that fails is reported (CSV status column) and the run goes on. The first run on a machine pays
  torch.compile's compile (cached by inductor for later runs; on CUDA max-autotune takes minutes per
  graph). --subprocess-variants (CUDA default: the torch.compile variants) run each (case, dtype, mode)
  in a child process under a wall-clock cap, --compile-timeout-s (skipped, and said so in the status
  column, when over the cap or the budget); the child times its variant alone, not interleaved (CSV note).

Timing (medians; every variant first runs --warmup untimed calls, the first timed alone: first_call_s,
which includes torch.compile's compile and Triton's autotuning)
  --timer call      one timed call per repetition, --reps interleaved repetitions. CPU:
                    time.perf_counter around the call; CUDA: a device synchronize, then CUDA events around
                    the call (elapsed_time after the end event completes). The output is held until the
                    clock stops.
  --timer do_bench  --reps interleaved rounds; a round times each variant by triton.testing.do_bench
                    (return_mode="median", --rep-ms / --reps ms after --warmup-ms; it flushes L2 before
                    every call, and one 1536/20 activation is 100-200 MB, far over the 50-60 MB L2; grads
                    set to None before every call); the row's time is the median of its rounds' medians.
                    train_bwd (an untimed forward before each call) and the CPU (--dry-run) use do_bench's
                    emulation instead: calls timed one by one as under --timer call, at least 3 and up to
                    the round's milliseconds (at most 50), their median; no L2 flush.
  --settle-ms       an untimed pause before each timed call: by default 250 ms on the CPU when a peer runtime
                    is among the variants (ONNX Runtime's threads spin after its calls and halved the rate of
                    the next variant's GEMMs), otherwise none.

Ceilings, measured once at start
  copy      CPU: a 32 MiB fp32 clone (past the L2 of one core pair); CUDA: a 2 GiB bf16 device-to-device
            copy (do_bench). Bytes read + written.
  GEMM      per dtype; CPU: a 16384 x 256 x 256 product (the pointwise conv's shape); CUDA: 8192^3 on
            random data (do_bench).
  FMA       the fp32 rate the depthwise conv can run at (it cannot use tensor cores). CUDA: an fp32
            FMA-chain Triton kernel (4 independent chains per thread: the CUDA-core rate); CPU: an fp32
            FMA-chain loop over the torch threads (csrc/cpu/fma_peak.cpp; the fp32 GEMM rate where the
            extension is not built). The CPU's GEMM ceiling is oneDNN's matmul.
  --tiny uses small ceiling shapes (a code-path check, not a measurement).
  Roofline floor of a row = max(floor bytes / copy GB/s, FLOPs / GEMM GFLOP/s); frac_floor = floor /
  measured. floor_fma uses the FMA ceiling for the depthwise FLOPs instead (the rest stay at the GEMM
  rate): max(floor bytes / copy, dw FLOPs / FMA + other FLOPs / GEMM); frac_floor_fma = floor_fma /
  measured. Floor bytes = every input of the whole row read once and every output written once: eval
  and train_fwd: x in, y out, the parameters and the BN running statistics in; train_bwd: dy and x in,
  dx (where the input requires grad) and the weight gradients out, the parameters in, the BN statistics;
  train: both.

Counts (counted, not measured): FLOPs of the convolutions/GEMMs only (forward 1x, backward 2x: input and
weight gradients; 1x where the input needs no gradient; activation/BN epilogues ignored); `bytes` = the
sum over the fused ops of every op input read once and every output written once (forward: x, y;
backward: dy, x, dx), weights included -- the traffic of the fused ops as they are split, against
floor_bytes, the whole row's.

Reported per variant: median ms, speed-up vs eager NCHW, achieved GFLOP/s against counted FLOPs and GB/s
against floor bytes, frac_floor(_fma), saved-activation bytes (training modes; saved_tensors_hooks over
one training forward, parameters and buffers excluded), on CUDA the peak memory of one call
(torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated before the
call's set-up: for train_bwd that includes the forward's saved tensors; CUDA graphs, which max-autotune
uses, allocate their pool at capture, in the warm-up, so theirs can read low), images/s for the models.
Writes into --out: bench_<device>.csv (after every case: a cut run keeps what it measured),
bench_<device>.json (meta, ceilings, the target rows' ratios, the measured triton-vs-cuda winner per op
for backends.CUDA_WINNERS: the geometric mean of t_triton / t_cuda over the dw rows and the pw rows both
measured), and unless --no-plots speedup_<device>.png (bars) and roofline_<device>.png (achieved FLOP/s vs
arithmetic intensity under the GEMM and copy ceilings).

Budget: --budget-s stops starting new measurements after that many seconds (rows then read
"skipped: budget"); --tune N keeps the first N autotune configs of every Triton kernel of the package
(autotuning compiles every config once per new key, and k=9 kernels take seconds each).

Must run on torch >= 2.6 / triton >= 3.2 APIs (the GPU machine has torch 2.11 + triton 3.6).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn

from .convert import convert
from .reference import ConvMixerPaper, Residual, make_act

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("eval", "train", "train_fwd", "train_bwd")
TRAIN_MODES = ("train", "train_fwd", "train_bwd")
DIRECTION = {"eval": "forward", "train": "forward+backward", "train_fwd": "forward", "train_bwd": "backward"}
CASE_DEFAULT_MODES = {"op": MODES, "layer": ("eval", "train"), "model": ("eval", "train")}
BLOCK_KEYS = ("dw", "pw", "stem", "layer")
MODEL_KEYS = ("model", "model768", "model1536")
# block shapes: name -> (batch (None: --gpu-batch), dim, H = W, depthwise k, act, stem patch)
SHAPES = {"cpu": (32, 256, 16, 9, "gelu", 2), "1536/20": (None, 1536, 32, 9, "gelu", 7),
          "768/32": (None, 768, 32, 7, "relu", 7)}
TINY_SHAPES = {"cpu": (2, 16, 8, 9, "gelu", 2), "1536/20": (2, 16, 8, 9, "gelu", 2),
               "768/32": (2, 8, 6, 7, "relu", 2)}
# (op, shape, dtype, mode): measured first; the only rows with torch.compile under --compile-rows targets
TARGET_ROWS = {("dw_block", "1536/20", "bf16", "eval"), ("mixer_layer", "1536/20", "bf16", "train")}
PROFILES = {
    "cpu": dict(keys=("dw", "pw", "stem", "layer", "model", "model768"), shapes=("cpu",), dtypes=("fp32", "bf16"),
                modes=(), dtype_modes={"bf16": ("eval",)}, reps=7, warmup=2, compile_modes=("default",),
                compile_rows="all", timer="call"),
    "cuda": dict(keys=("dw", "pw", "layer"), shapes=("1536/20", "768/32"), dtypes=("bf16", "fp16"),
                 modes=("eval", "train"), reps=2, warmup=1, compile_modes=("default", "max-autotune"),
                 compile_rows="targets", timer="do_bench"),
}
CSV_FIELDS = ["case", "op", "kind", "dtype", "mode", "direction", "variant", "backend", "layout", "status",
              "median_ms", "min_ms", "speedup_vs_eager_nchw", "saved_bytes", "peak_mem_bytes", "img_per_s",
              "batch", "flops", "bytes", "gflops_per_s", "reps", "device", "threads", "torch", "date", "command",
              "gemm_gflops", "copy_gbs",
              "shape", "timer", "first_call_s", "floor_bytes", "gb_per_s", "floor_ms", "frac_floor",
              "floor_fma_ms", "frac_floor_fma", "fma_gflops", "triton", "tune", "note"]


def _log(s=""):
    print(s, flush=True)


# --- counts: FLOPs and bytes ------------------------------------------------------------------------

class Counts(NamedTuple):
    fwd_flops: int
    bwd_flops: int
    fwd_el: int             # elements every fused op reads once + writes once (bytes = element size x this)
    bwd_el: int
    dw_fwd_flops: int = 0   # the depthwise part of the FLOPs (FMA units, no tensor cores)
    dw_bwd_flops: int = 0


def _dw_counts(n, c, h, w, k, dx=True) -> Counts:
    a = n * c * h * w
    wts = c * k * k + c
    f, b = 2 * k * k * a, (2 if dx else 1) * 2 * k * k * a
    return Counts(f, b, 2 * a + wts, (3 if dx else 2) * a + 2 * wts, f, b)


def _cab_counts(n, cin, h, w, cout, p, dx=True) -> Counts:
    m = n * (h // p) * (w // p)
    kdim = cin * p * p
    x_el, y_el, wts = n * cin * h * w, m * cout, cout * kdim + cout
    f = 2 * m * kdim * cout
    return Counts(f, (2 if dx else 1) * f, x_el + y_el + wts, y_el + (2 if dx else 1) * x_el + 2 * wts)


def _sum_counts(*cs) -> Counts:
    return Counts(*(sum(c[i] for c in cs) for i in range(len(Counts._fields))))


def _model_counts(n, dim, depth, k, p, img) -> Counts:
    hw = img // p
    stem = _cab_counts(n, 3, img, img, dim, p, dx=False)
    layer = _sum_counts(_dw_counts(n, dim, hw, hw, k), _cab_counts(n, dim, hw, hw, dim, 1))
    return _sum_counts(stem, *([layer] * depth))


def _per_mode(fwd, bwd, mode):
    return {"eval": fwd, "train_fwd": fwd, "train_bwd": bwd, "train": fwd + bwd}[mode]


def floor_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, input_grad: bool) -> int:
    """Roofline floor bytes of one call of the whole row (see the module docstring): the parameters in
    their dtype (BN's fp32), the BN running statistics, x, y, dy and dx each moved once."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bn_ids = {id(p) for m in bns for p in m.parameters()}
    w = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in bn_ids)
    bn = sum(t.numel() * t.element_size() for m in bns
             for t in (*m.parameters(), m.running_mean, m.running_var) if t is not None)
    xb, yb = x.numel() * x.element_size(), y.numel() * y.element_size()
    fwd = xb + yb + w + bn
    bwd = yb + xb + (xb if input_grad else 0) + 2 * w + bn
    return _per_mode(fwd, bwd, mode)


# --- cases ------------------------------------------------------------------------------------------

@dataclass
class Case:
    key: str                 # command-line name: dw, pw, stem, layer, model, model768, model1536
    name: str                # printed / CSV case name (with the shape)
    op: str                  # dw_block, pointwise, stem, mixer_layer, convmixer_256_8, ...
    kind: str                # "op", "layer" or "model"
    build: Callable[[], nn.Module]  # the eager (unfused) module
    input_shape: tuple
    input_grad: bool         # whether x requires grad in the training modes
    counts: Callable[[], Counts]
    batch: int = 0
    shape: str = ""          # the block shape's name (--shapes); the models: their h/d


def build_cases(device: str, tiny: bool = False, gpu_batch: int = 64, op_shape: Optional[tuple] = None,
                kernel_size: Optional[int] = None, patch: Optional[int] = None, act: Optional[str] = None,
                model_batch: Optional[int] = None, shape: Optional[str] = None) -> Dict[str, Case]:
    """Every case this benchmark knows at one block shape (default: "cpu" on the CPU, "1536/20" on CUDA)
    and the device's model batches (see the module docstring)."""
    gpu = device != "cpu"
    shape = shape or ("1536/20" if gpu else "cpu")
    if shape not in SHAPES:
        raise ValueError(f"--shapes: unknown {shape!r} (expected {', '.join(SHAPES)})")
    n, dim, hw, k, a0, p = (TINY_SHAPES if tiny else SHAPES)[shape]
    n = n or gpu_batch
    k, p, act = kernel_size or k, patch or p, act or a0
    if op_shape:
        n, dim, hw_h, hw_w = op_shape
        hw = hw_h
        if hw_h != hw_w:
            raise ValueError("--op-shape: only square H = W is supported")

    def dw_mod(d, kk, a):
        return Residual(nn.Sequential(nn.Conv2d(d, d, kk, groups=d, padding="same"), make_act(a),
                                      nn.BatchNorm2d(d)))

    def pw_mod(cin, cout, pp, a):
        return nn.Sequential(nn.Conv2d(cin, cout, pp, stride=pp), make_act(a), nn.BatchNorm2d(cout))

    shp, sa = f"{n}x{dim}x{hw}x{hw}", ("" if act == "gelu" else f" {act}")
    cases = {
        "dw": Case("dw", f"dw_block {shp} k{k}{sa}", "dw_block", "op", lambda: dw_mod(dim, k, act),
                   (n, dim, hw, hw), True, lambda: _dw_counts(n, dim, hw, hw, k), n, shape),
        "pw": Case("pw", f"pointwise {shp}{sa}", "pointwise", "op", lambda: pw_mod(dim, dim, 1, act),
                   (n, dim, hw, hw), True, lambda: _cab_counts(n, dim, hw, hw, dim, 1), n, shape),
        "stem": Case("stem", f"stem {n}x3x{hw * p}x{hw * p} p{p} ->{dim}{sa}", "stem", "op",
                     lambda: pw_mod(3, dim, p, act), (n, 3, hw * p, hw * p), False,
                     lambda: _cab_counts(n, 3, hw * p, hw * p, dim, p, dx=False), n, shape),
        "layer": Case("layer", f"mixer_layer {shp} k{k}{sa}", "mixer_layer", "layer",
                      lambda: nn.Sequential(dw_mod(dim, k, act), *pw_mod(dim, dim, 1, act)), (n, dim, hw, hw), True,
                      lambda: _sum_counts(_dw_counts(n, dim, hw, hw, k), _cab_counts(n, dim, hw, hw, dim, 1)), n,
                      shape),
    }
    # models: (key, op name, shape, dim, depth, k, p, act, image size, batch)
    if tiny:
        models = [("model", "convmixer_256_8", "256/8", 16, 2, 9, 2, "gelu", 16, 2),
                  ("model768", "convmixer_768_32", "768/32", 16, 2, 7, 7, "relu", 28, 2),
                  ("model1536", "convmixer_1536_20", "1536/20", 16, 2, 9, 7, "gelu", 28, 2)]
    else:
        cifar_b, big_b = (gpu_batch, gpu_batch) if gpu else (64, 2)
        models = [("model", "convmixer_256_8", "256/8", 256, 8, 9, 2, "gelu", 32, cifar_b),
                  ("model768", "convmixer_768_32", "768/32", 768, 32, 7, 7, "relu", 224, big_b),
                  ("model1536", "convmixer_1536_20", "1536/20", 1536, 20, 9, 7, "gelu", 224, big_b)]
    for key, opname, mshape, d, depth, kk, pp, a, img, b in models:
        b = model_batch or b
        cases[key] = Case(
            key, f"{opname} b{b} {img}px k{kk} p{pp}" + ("" if a == "gelu" else f" {a}") + (" (tiny)" if tiny else ""),
            opname, "model",
            (lambda d=d, depth=depth, kk=kk, pp=pp, a=a, img=img: ConvMixerPaper(
                d, depth, kernel_size=kk, patch_size=pp, n_classes=10 if img == 32 else 1000, act=a)),
            (b, 3, img, img), False, (lambda b=b, d=d, depth=depth, kk=kk, pp=pp, img=img:
                                      _model_counts(b, d, depth, kk, pp, img)), b, mshape)
    return cases


def default_case_keys(device: str) -> List[str]:
    return list(PROFILES["cuda" if device != "cpu" else "cpu"]["keys"])


# --- variants ---------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    backend: str   # eager, inductor, inductor-max-autotune, or the fused backend
    layout: str    # nchw / channels_last
    model: Optional[nn.Module]
    x: Optional[torch.Tensor]
    compiled: bool = False
    dy_format: torch.memory_format = torch.contiguous_format
    error: Optional[str] = None
    call: Optional[Callable[[], object]] = None  # a CPU peer (cpu_peers): one inference, eval rows only
    note: str = ""


def compile_variant_name(mode: str) -> str:
    return "torch_compile" if mode == "default" else "torch_compile_" + mode.replace("-", "_")


def variant_specs(fused_backends: List[str], compile_modes: List[str], fused_layouts: List[str],
                  peers: Optional[List[str]] = None) -> Dict[str, tuple]:
    """The variants of a run in order: name -> (kind: eager/compile/peer/fused, backend, layout, compile mode)."""
    specs = {"eager_nchw": ("eager", "eager", "nchw", None),
             "eager_channels_last": ("eager", "eager", "channels_last", None)}
    for cm in compile_modes:
        specs[compile_variant_name(cm)] = ("compile", "inductor" if cm == "default" else f"inductor-{cm}", "nchw", cm)
    for p in peers or []:
        specs[p] = ("peer", p, "nchw", None)
    for b in fused_backends:
        for lay in fused_layouts:
            specs[f"fused_{b}" if lay == "channels_last" else f"fused_{b}_nchw"] = ("fused", b, lay, None)
    return specs


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {msg[0][:200] if msg else ''}"


def make_variant(name: str, spec: tuple, eager: nn.Module, x: torch.Tensor, compile_backend: str = "inductor",
                 log=_log) -> Variant:
    """One variant of the eager module; a failure is recorded in .error (the run goes on)."""
    kind, backend, layout, cm = spec
    cl = torch.channels_last
    if kind == "peer":
        return make_peer_variant(name, eager, x, compile_backend, log)
    try:
        if kind == "eager":
            m, xv = (eager, x.clone()) if layout == "nchw" else (copy.deepcopy(eager).to(memory_format=cl),
                                                                 x.contiguous(memory_format=cl))
        elif kind == "compile":
            kw = {} if cm == "default" or compile_backend != "inductor" else {"mode": cm}
            m, xv = torch.compile(copy.deepcopy(eager), backend=compile_backend, **kw), x.clone()
        else:
            m, xv = convert(eager, backend=backend), x.clone()
            if layout == "channels_last":
                m, xv = m.to(memory_format=cl), x.contiguous(memory_format=cl)
    except Exception as e:  # noqa: BLE001  (reported in the CSV, the run goes on)
        return Variant(name, backend, layout, None, None, compiled=kind == "compile", error=_err(e))
    v = Variant(name, backend, layout, m, xv, compiled=kind == "compile")
    base = getattr(m, "_orig_mod", m)  # output memory format (for dy), from the eager module underneath
    try:
        base.eval()
        with torch.no_grad():
            y = base(xv)
        v.dy_format = (cl if y.dim() == 4 and not y.is_contiguous() and y.is_contiguous(memory_format=cl)
                       else torch.contiguous_format)
    except Exception as e:  # noqa: BLE001
        v.error = _err(e)
        log(f"    {v.name}: {v.error}")
    return v


def make_peer_variant(name: str, eager: nn.Module, x: torch.Tensor, compile_backend: str = "inductor",
                      log=_log) -> Variant:
    """A CPU runtime (cpu_peers.PEERS) built from the eager module; its note carries its largest deviation
    from the eager output on the run's input (a peer is timed only if it computes the same function)."""
    from . import cpu_peers
    v = Variant(name, name, "nchw", None, x, compiled=name.startswith("torch_compile"))
    try:
        v.call = cpu_peers.build_peer(name, eager, x, torch.get_num_threads(), compile_backend)
        with torch.no_grad():
            eager.eval()
            ref = eager(x).float()
            y = cpu_peers.peer_output(v.call())
            dev = (y - ref).abs().max().item() if y.shape == ref.shape else float("nan")
        scale = ref.abs().max().item()
        v.note = "; ".join(n for n in (cpu_peers.peer_note(name, x.dtype),
                                       f"max |y - eager| {dev:.1e} (|y| <= {scale:.1e})") if n)
        if not dev <= 0.05 * scale + 1e-3:  # NaN included: not the same function
            v.error = f"error: output differs from eager: {v.note}"
            log(f"    {name}: {v.error}")
    except cpu_peers.PeerUnavailable as e:
        v.error = f"skipped: {e}"
        log(f"    {name}: {v.error}")
    except Exception as e:  # noqa: BLE001  (reported in the CSV, the run goes on)
        v.error = _err(e)
        log(f"    {name}: {v.error}")
    return v


def _step(v: Variant, mode: str, dy: torch.Tensor, input_grad: bool, device: str):
    """(setup, fn, grads) for one variant and mode: setup runs untimed before every timed fn; grads is
    not None where setup only sets those tensors' .grad to None (do_bench's grad_to_none does the same)."""
    if v.call is not None:
        if mode != "eval":
            raise ValueError(f"{v.name} is an inference runtime: eval rows only")
        return None, v.call, None
    model, x = v.model, v.x
    model.train(mode != "eval")
    x.requires_grad_(mode != "eval" and input_grad)
    params = list(model.parameters())
    grads = params + ([x] if x.requires_grad else [])
    mark = (getattr(torch.compiler, "cudagraph_mark_step_begin", None)
            if v.compiled and device == "cuda" else None)

    def fwd():
        if mark is not None:
            mark()
        return model(x)

    def clear():
        for t in grads:
            t.grad = None

    if mode == "eval":
        def fn():
            with torch.no_grad():
                return fwd()
        return None, fn, None
    if mode == "train":
        def fn():
            fwd().backward(dy)
        return clear, fn, grads
    if mode == "train_fwd":
        return clear, fwd, grads
    if mode == "train_bwd":
        state = {}

        def setup():
            clear()
            state["y"] = fwd()

        def fn():
            state.pop("y").backward(dy)
        return setup, fn, None
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


# --- timing -----------------------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_ms(fn: Callable, device: str) -> float:
    """One call of fn in milliseconds; its return value is held until the clock stops."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        del out
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    del out
    return (t1 - t0) * 1e3


def _do_bench(fn: Callable, setup: Optional[Callable], grads, device: str, rep_ms: float, warmup_ms: float) -> float:
    """Median ms of fn: triton.testing.do_bench on CUDA where it applies (no setup other than clearing
    grads); otherwise its emulation (see the module docstring)."""
    if device == "cuda" and (setup is None or grads is not None):
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads, return_mode="median"))
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        if setup:
            setup()
        times.append(_timed_ms(fn, device))
    return statistics.median(times)


# --- ceilings and the roofline floor ----------------------------------------------------------------

def _onednn_bf16_native() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512_BF16 or AMX-BF16): the test the C++ backend makes
    (csrc/cpu/onednn_gemm.cpp, onednn_bf16_native) before it runs a bf16 GEMM in bf16 rather than fp32."""
    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def measure_ceilings(device: str, dtypes: List[str], tiny: bool = False) -> dict:
    """The ceilings the floors are counted against, measured here (see the module docstring):
    {copy_gbs, gemm_gflops: {dtype: GFLOP/s}, fma_gflops (None if unmeasured), fma_source[, fma_error]}."""
    out = {"copy_gbs": None, "gemm_gflops": {}, "fma_gflops": None, "fma_source": ""}
    if device == "cuda":
        def ms(fn):
            return _do_bench(fn, None, None, device, 200, 50)
        a = torch.randn((2 << 30) // 2, device=device, dtype=torch.bfloat16)  # 2 GiB
        b = torch.empty_like(a)
        out["copy_gbs"] = 2 * a.numel() * a.element_size() / ms(lambda: b.copy_(a)) / 1e6
        a = b = None  # free the 4 GiB
        m = k = n = 8192
    else:
        reps = 5 if tiny else 15

        def ms(fn):
            for _ in range(3):
                fn()
            return statistics.median(_timed_ms(fn, device) for _ in range(reps))
        big = torch.randn(((4 << 20) if tiny else (32 << 20)) // 4)
        out["copy_gbs"] = 2 * big.numel() * 4 / ms(lambda: big.clone()) / 1e6
        del big
        m, k, n = (512 if tiny else 16384), 256, 256
    # The CPU's GEMM ceiling is oneDNN's matmul, the library its blocks use (torch.mm is MKL there,
    # about 0.7x oneDNN's rate on this machine's ConvMixer shapes: benchmarks/RESULTS.md).
    onednn = device == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    out["gemm_source"] = "oneDNN matmul (mkldnn::_linear_pointwise)" if onednn else "torch.mm"
    for d in dict.fromkeys(list(dtypes) + ([] if device == "cuda" else ["fp32"])):
        dt = DTYPES[d]
        if onednn and dt == torch.bfloat16 and not _onednn_bf16_native():
            # No native bf16 matmul (no AVX512_BF16/AMX: oneDNN cannot create a bf16 inner product); the CPU
            # blocks then run their bf16 GEMMs in fp32 (cpu_gemm_library), so fp32 is the ceiling.
            dt = torch.float32
            out["gemm_source"] += "; bf16 measured in fp32 (no native bf16 matmul on this CPU)"
        a = torch.randn(m, k, device=device).to(dt)
        b = torch.randn(k, n, device=device).to(dt)
        if onednn:
            bt = b.t().contiguous()
            out["gemm_gflops"][d] = 2 * m * k * n / ms(
                lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")) / 1e6
        else:
            out["gemm_gflops"][d] = 2 * m * k * n / ms(lambda: torch.mm(a, b)) / 1e6
    a = b = None
    if device == "cuda":
        try:
            out["fma_gflops"], out["fma_source"] = _fma_ceiling(device), "fp32 FMA-chain Triton kernel"
        except Exception as e:  # noqa: BLE001  (informational: the fma columns stay empty)
            out["fma_error"] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()
    else:
        try:
            from . import _C
            out["fma_gflops"] = statistics.median(_C.cpu_fma_peak_gflops(2_000_000 if tiny else 20_000_000)
                                                  for _ in range(3))
            out["fma_source"] = "fp32 FMA-chain loop over the torch threads (csrc/cpu/fma_peak.cpp)"
        except (ImportError, AttributeError) as e:  # the extension is not built: the GEMM rate instead
            out["fma_gflops"], out["fma_source"] = out["gemm_gflops"]["fp32"], f"fp32 GEMM ({e})"
    return out


def _fma_ceiling(device, n=1 << 24, iters=512, block=1024) -> float:
    """GFLOP/s of 4 independent fp32 FMA chains per thread (the CUDA-core rate)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(x_ptr, y_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs)
        b = a * 0.999 + 0.5
        c = a * 0.5 + 0.25
        d = b * 0.25 + 0.125
        for i in range(ITERS):  # 4 independent dependency chains
            a = a * 0.9999 + 0.0001
            b = b * 0.9999 + 0.0001
            c = c * 0.9999 + 0.0001
            d = d * 0.9999 + 0.0001
        tl.store(y_ptr + offs, a + b + c + d)

    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    ms = _do_bench(lambda: fma_kernel[(n // block,)](x, y, ITERS=iters, BLOCK=block, num_warps=8), None, None,
                   device, 100, 20)
    return 2 * 4 * iters * n / ms / 1e6


def add_floors(results: List["Result"], ceil: dict) -> None:
    """Fills floor_ms, frac_floor, floor_fma_ms and frac_floor_fma of the measured rows (module docstring)."""
    copy_gbs, fma = ceil.get("copy_gbs"), ceil.get("fma_gflops")
    for r in results:
        gemm = ceil.get("gemm_gflops", {}).get(r.dtype)
        if not (r.median_ms and r.floor_bytes and r.flops and copy_gbs and gemm):
            continue
        mem_ms = r.floor_bytes / (copy_gbs * 1e6)
        r.floor_ms = max(mem_ms, r.flops / (gemm * 1e6))
        r.frac_floor = r.floor_ms / r.median_ms
        if fma:
            r.floor_fma_ms = max(mem_ms, r.dw_flops / (fma * 1e6) + (r.flops - r.dw_flops) / (gemm * 1e6))
            r.frac_floor_fma = r.floor_fma_ms / r.median_ms


# --- measurement ------------------------------------------------------------------------------------

@dataclass
class Result:
    case: str
    mode: str
    variant: str
    median_ms: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)
    saved_bytes: Optional[int] = None
    op: str = ""
    kind: str = ""
    dtype: str = "fp32"
    backend: str = ""
    layout: str = ""
    status: str = "ok"
    peak_mem_bytes: Optional[int] = None
    batch: int = 0
    flops: Optional[int] = None
    bytes: Optional[int] = None
    key: str = ""
    shape: str = ""
    timer: str = ""
    first_call_s: Optional[float] = None
    floor_bytes: Optional[int] = None
    dw_flops: int = 0
    floor_ms: Optional[float] = None
    frac_floor: Optional[float] = None
    floor_fma_ms: Optional[float] = None
    frac_floor_fma: Optional[float] = None
    note: str = ""

    @property
    def img_per_s(self) -> Optional[float]:
        if self.kind == "model" and self.median_ms:
            return self.batch * 1e3 / self.median_ms
        return None

    @property
    def gflops_per_s(self) -> Optional[float]:
        return self.flops / self.median_ms / 1e6 if self.flops and self.median_ms else None

    @property
    def gb_per_s(self) -> Optional[float]:
        return self.floor_bytes / self.median_ms / 1e6 if self.floor_bytes and self.median_ms else None


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> Optional[int]:
    """Bytes of the distinct tensors autograd saves for the backward of one training forward,
    parameters and buffers excluded (they exist anyway)."""
    owned = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    seen: Dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in owned and t.numel() > 0:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


@dataclass
class Settings:
    device: str
    keys: List[str]
    modes: List[str]          # empty: each case's default modes (for a dtype in dtype_modes: those of them)
    dtypes: List[str]
    reps: int
    model_reps: int
    warmup: int
    compile_modes: List[str]
    fused_layouts: List[str]
    cases: List[Case]         # in run order: every shape's block cases, then the models
    profile: str = "cpu"      # whose defaults: "cpu" or "cuda" (--dry-run: "cuda" on the CPU)
    shapes: List[str] = field(default_factory=list)
    timer: str = "call"
    rep_ms: float = 100.0
    warmup_ms: float = 25.0
    compile_backend: str = "inductor"
    compile_rows: str = "all"
    subprocess_variants: List[str] = field(default_factory=list)
    compile_timeout_s: float = 150.0
    variants: List[str] = field(default_factory=list)   # empty: every variant
    peers: List[str] = field(default_factory=list)      # CPU runtimes (cpu_peers.PEERS) in the eval rows
    settle_ms: Optional[float] = None                   # pause before each timed CPU call (None: see _settle_s)
    dtype_modes: Dict[str, tuple] = field(default_factory=dict)  # the profile's modes per dtype (no --modes)

    def case_modes(self, case: "Case", dtype: str) -> List[str]:
        if self.modes:
            return list(self.modes)
        modes = CASE_DEFAULT_MODES[case.kind]
        return [m for m in modes if m in self.dtype_modes.get(dtype, modes)]
    tiny: bool = False
    deadline: Optional[float] = None                     # time.time() after which nothing new starts
    verbose: bool = False
    argv: List[str] = field(default_factory=list)        # for the child processes

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


def _result(case: Case, mode: str, dtype_name: str, name: str, spec: tuple, st: Settings, **kw) -> Result:
    return Result(case.name, mode, name, op=case.op, kind=case.kind, dtype=dtype_name, backend=spec[1],
                  layout=spec[2], batch=case.batch, key=case.key, shape=case.shape, timer=st.timer, **kw)


def _settle_s(variants: List[Variant], st: Settings) -> float:
    """Seconds to pause before each timed call. ONNX Runtime's worker threads spin after a call (its default,
    session.intra_op.allow_spinning), and on a 2-core machine a torch GEMM timed right after an ONNX Runtime
    call ran at half its rate (benchmarks/RESULTS.md); a 30 ms pause was not enough, 200 ms was. So on the CPU,
    with a peer runtime among the variants, every timed call starts after 250 ms with no other runtime's
    threads awake; the pause is not timed. --settle-ms sets it."""
    if st.settle_ms is not None:
        return st.settle_ms / 1e3
    return 0.25 if st.device == "cpu" and any(v.call is not None for v in variants) else 0.0


def bench_mode(case: Case, mode: str, dtype_name: str, variants: List[Variant], dy0: torch.Tensor,
               row_floor_bytes: Optional[int], st: Settings, log=_log) -> List[Result]:
    """One (case, dtype, mode): warms every variant up, then times them in interleaved repetitions."""
    dev = st.device
    c = case.counts()
    esize = torch.finfo(DTYPES[dtype_name]).bits // 8
    reps = st.reps if case.kind == "op" else st.model_reps
    counts = dict(flops=_per_mode(c.fwd_flops, c.bwd_flops, mode), bytes=esize * _per_mode(c.fwd_el, c.bwd_el, mode),
                  dw_flops=_per_mode(c.dw_fwd_flops, c.dw_bwd_flops, mode), floor_bytes=row_floor_bytes)
    results: Dict[str, Result] = {}
    ready: Dict[str, tuple] = {}
    for v in variants:
        res = _result(case, mode, dtype_name, v.name, ("", v.backend, v.layout), st, note=v.note, **counts)
        results[v.name] = res
        if v.error:
            res.status = v.error
            continue
        if st.past_deadline():
            res.status = "skipped: budget"
            continue
        try:
            setup, fn, grads = _step(v, mode, dy0.contiguous(memory_format=v.dy_format), case.input_grad, dev)
            t0 = time.perf_counter()
            for i in range(max(1, st.warmup)):
                if setup:
                    setup()
                out = fn()
                del out
                if i == 0:
                    _sync(dev)
                    res.first_call_s = time.perf_counter() - t0
            _sync(dev)
            note = f" (first call {res.first_call_s:.2f}s" + (", incl. compile)" if v.compiled else ")")
            if dev == "cuda":  # peak memory of one call, over what was allocated before its set-up
                base = torch.cuda.memory_allocated()
                if setup:
                    setup()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                out = fn()
                torch.cuda.synchronize()
                res.peak_mem_bytes = torch.cuda.max_memory_allocated() - base
                del out
                note += f" peak {res.peak_mem_bytes / 2**20:.1f} MB"
            ready[v.name] = (setup, fn, grads)
            log(f"    ready {v.name}{note}")
        except Exception as e:  # noqa: BLE001
            res.status = _err(e)
            log(f"    {v.name}: {res.status}")
            if st.verbose or os.environ.get("CONVMIXER_BENCH_DEBUG"):
                traceback.print_exc()
    settle = _settle_s(variants, st)
    for r in range(reps):
        for name, (setup, fn, grads) in list(ready.items()):  # interleaved: every variant once per repetition
            if st.past_deadline() and results[name].times_ms:
                continue
            time.sleep(settle)
            try:
                if st.timer == "do_bench":
                    t = _do_bench(fn, setup, grads, dev, st.rep_ms / reps, st.warmup_ms)
                else:
                    if setup:
                        setup()
                    t = _timed_ms(fn, dev)
                results[name].times_ms.append(t)
            except Exception as e:  # noqa: BLE001
                results[name].status = _err(e)
                del ready[name]
                log(f"    {name}: {results[name].status}")
        log(f"    rep {r + 1}/{reps}: " + "  ".join(f"{n}={results[n].times_ms[-1]:.3f}ms" for n in ready))
    for res in results.values():
        if res.status == "ok" and res.times_ms:
            res.median_ms = statistics.median(res.times_ms)
        elif res.status == "ok":
            res.status = "error: no timed repetition"
    return list(results.values())


def run_child(case: Case, mode: str, dtype_name: str, name: str, spec: tuple, st: Settings, log=_log) -> Result:
    """One variant of one (case, dtype, mode) in a child process (this module, the run's options plus
    --single) under min(--compile-timeout-s, the budget left): torch.compile max-autotune can take minutes."""
    res = _result(case, mode, dtype_name, name, spec, st, note="child process (timed alone)")
    cap = st.compile_timeout_s
    if st.deadline is not None:
        cap = min(cap, max(0.0, st.deadline - time.time()))
    if cap < 20:
        res.status = "skipped: budget"
        return res
    cmd = [sys.executable, "-m", "convmixer_kernels.benchmark", *st.argv,
           "--single", json.dumps([case.key, case.shape, dtype_name, mode, name])]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log(f"    {name}: child process (cap {cap:.0f}s)")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=env)
    except subprocess.TimeoutExpired:
        res.status = f"skipped: over the {cap:.0f}s cap"
        log(f"    {name}: {res.status}")
        return res
    for line in p.stdout.splitlines():
        if line.startswith("SINGLE_JSON "):
            d = json.loads(line[len("SINGLE_JSON "):])
            out = Result(**{k: v for k, v in d.items() if k in Result.__dataclass_fields__})
            out.note = res.note
            return out
        if line.startswith("    "):
            log("    [child]" + line[3:])
    last = (p.stderr or "").strip().splitlines()[-1:]
    res.status = f"error: child rc={p.returncode}: {last[0][:200] if last else ''}"
    log(f"    {name}: {res.status}")
    return res


def bench_case(case: Case, modes: List[str], dtype_name: str, st: Settings, fused_backends: List[str],
               log=_log, only: Optional[List[str]] = None) -> List[Result]:
    """Every mode of one case and dtype; the in-process variants are built once and shared by the modes,
    the --subprocess-variants run per mode in a child process after them."""
    specs = variant_specs(fused_backends, st.compile_modes, st.fused_layouts, st.peers)
    if st.variants:
        specs = {n: s for n, s in specs.items() if n in st.variants}
    if only is not None:
        specs = {n: s for n, s in specs.items() if n in only}

    def wants(name, mode):
        if specs[name][0] == "peer":  # inference runtimes: eval rows
            return mode == "eval"
        if specs[name][0] != "compile":
            return True
        return st.compile_rows == "all" or (st.compile_rows == "targets" and
                                            (case.op, case.shape, dtype_name, mode) in TARGET_ROWS)

    child = [n for n in specs if n in st.subprocess_variants]
    local = [n for n in specs if n not in child and any(wants(n, m) for m in modes)]
    if st.past_deadline():
        return [_result(case, m, dtype_name, n, specs[n], st, status="skipped: budget")
                for m in modes for n in specs if wants(n, m)]
    if any(specs[n][0] == "compile" or n == "torch_compile_freezing" for n in local):
        from torch import _dynamo
        _dynamo.reset()  # a fresh compile cache per case: no recompile limit, no dynamic shapes
    dev, dtype = st.device, DTYPES[dtype_name]
    torch.manual_seed(0)
    eager = _randomize_bn(case.build()).to(device=dev, dtype=dtype)
    for m in eager.modules():  # BN parameters and running statistics stay fp32 (the AMP convention)
        if isinstance(m, nn.BatchNorm2d):
            m.float()
    x = torch.randn(case.input_shape, device=dev, dtype=dtype)
    with torch.no_grad():
        eager.eval()
        y = eager(x)
        dy0 = torch.randn_like(y)
    floors = {m: floor_bytes(eager, x, y, m, case.input_grad) for m in modes}
    del y
    variants = [make_variant(n, specs[n], eager, x, st.compile_backend, log) for n in local]
    results = []
    for mode in modes:
        t0 = time.perf_counter()
        log(f"[bench] {case.name} {dtype_name} [{mode}]")
        rs = bench_mode(case, mode, dtype_name, [v for v in variants if wants(v.name, mode)], dy0, floors[mode],
                        st, log)
        rs += [run_child(case, mode, dtype_name, n, specs[n], st, log) for n in child if wants(n, mode)]
        results += rs
        log("    medians: " + "  ".join(f"{r.variant}={r.median_ms:.3f}ms" if r.median_ms else
                                        f"{r.variant}=({r.status[:40]})" for r in rs)
            + f"  ({time.perf_counter() - t0:.1f}s)")
    if any(m in TRAIN_MODES for m in modes):
        for v in variants:
            if v.error:
                continue
            try:
                v.model.train()
                v.x.requires_grad_(case.input_grad)
                if v.compiled and dev == "cuda" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                    torch.compiler.cudagraph_mark_step_begin()
                saved = saved_activation_bytes(v.model, v.x)
            except Exception as e:  # noqa: BLE001
                log(f"    saved bytes of {v.name}: {_err(e)}")
                saved = None
            for r in results:
                if r.variant == v.name and r.mode in TRAIN_MODES and r.status == "ok":
                    r.saved_bytes = saved
    del variants
    if dev == "cuda":
        torch.cuda.empty_cache()
    return results


# --- reports: table, CSV, JSON (target ratios, winners), plots -------------------------------------

def _groups(results: List[Result]) -> Dict[tuple, List[Result]]:
    by: Dict[tuple, List[Result]] = {}
    for r in results:
        by.setdefault((r.case, r.dtype, r.mode), []).append(r)
    return by


def _base_ms(rs: List[Result]) -> Optional[float]:
    return next((r.median_ms for r in rs if r.variant == "eager_nchw" and r.median_ms), None)


def _base_saved(rs: List[Result]) -> Optional[int]:
    return next((r.saved_bytes for r in rs if r.variant == "eager_nchw" and r.saved_bytes), None)


def _best(rs: List[Result], fused: bool) -> Optional[Result]:
    pick = [r for r in rs if r.median_ms and r.variant.startswith("fused") == fused and r.variant != "eager_nchw"]
    return min(pick, key=lambda r: r.median_ms) if pick else None


def _cell(v, spec, width, scale=1.0, suffix=""):
    return (format(v * scale, spec) + suffix) if v is not None else f"{'-':>{width}}"


def format_table(results: List[Result]) -> str:
    """Grouped by case (and dtype): one row per mode and variant, then a summary of the best fused
    variant against eager NCHW and against the best of the other baselines."""
    lines = []
    cuda = any(r.peak_mem_bytes is not None for r in results)
    models = any(r.kind == "model" for r in results)
    fma = any(r.frac_floor_fma is not None for r in results)
    cases: Dict[tuple, Dict[str, List[Result]]] = {}
    for (case, dt, mode), rs in _groups(results).items():
        cases.setdefault((case, dt), {})[mode] = rs
    head = (f"  {'mode':<10}{'variant':<28}{'median ms':>11}{'vs eager':>10}{'GFLOP/s':>9}{'GB/s':>8}{'floor%':>8}"
            + (f"{'fma%':>7}" if fma else "") + f"{'saved MB':>10}{'saved %':>9}"
            + (f"{'peak MB':>10}" if cuda else "") + (f"{'img/s':>9}" if models else ""))
    for (case, dt), modes in cases.items():
        lines.append(f"\n{case} [{dt}]")
        lines.append(head)
        for mode, rs in modes.items():
            base, bsaved = _base_ms(rs), _base_saved(rs)
            for i, r in enumerate(rs):
                m = mode if i == 0 else ""
                if r.status != "ok" or not r.median_ms:
                    lines.append(f"  {m:<10}{r.variant:<28}  {r.status[:80]}")
                    continue
                pct = r.saved_bytes / bsaved if r.saved_bytes is not None and bsaved else None
                lines.append(
                    f"  {m:<10}{r.variant:<28}{r.median_ms:11.3f}"
                    + _cell(base / r.median_ms if base else None, "9.2f", 10, suffix="x")
                    + _cell(r.gflops_per_s, "9.1f", 9) + _cell(r.gb_per_s, "8.1f", 8)
                    + _cell(r.frac_floor, "7.1f", 8, 100, "%")
                    + (_cell(r.frac_floor_fma, "6.1f", 7, 100, "%") if fma else "")
                    + _cell(r.saved_bytes, "10.1f", 10, 2 ** -20) + _cell(pct, "8.0f", 9, 100, "%")
                    + (_cell(r.peak_mem_bytes, "10.1f", 10, 2 ** -20) if cuda else "")
                    + (_cell(r.img_per_s, "9.1f", 9) if models else ""))
    lines.append("\nSummary: the fastest fused variant per case and mode, against eager NCHW and against the "
                 "fastest non-fused baseline other than eager NCHW")
    cw = max([len(r.case) for r in results] + [4]) + 2
    lines.append(f"  {'case':<{cw}}{'dtype':<6}{'mode':<10}{'fused':<22}{'ms':>9}{'vs eager':>10}{'vs best other':>15}"
                 f"  best other")
    for (case, dt, mode), rs in _groups(results).items():
        f, o, base = _best(rs, True), _best(rs, False), _base_ms(rs)
        if f is None:
            lines.append(f"  {case:<{cw}}{dt:<6}{mode:<10}(no fused variant measured)")
            continue
        lines.append(f"  {case:<{cw}}{dt:<6}{mode:<10}{f.variant:<22}{f.median_ms:9.3f}"
                     + (f"{base / f.median_ms:9.2f}x" if base else f"{'-':>10}")
                     + (f"{o.median_ms / f.median_ms:14.2f}x  {o.variant}" if o else f"{'-':>15}"))
    return "\n".join(lines)


def write_csv(results: List[Result], path: str, meta: dict, ceil: dict):
    def num(v, spec):
        return format(v, spec) if v is not None else ""

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for (case, dt, mode), rs in _groups(results).items():
            base = _base_ms(rs)
            for r in rs:
                row = dict(case=r.case, op=r.op, kind=r.kind, dtype=r.dtype, mode=r.mode,
                           direction=DIRECTION.get(r.mode, ""), variant=r.variant, backend=r.backend, layout=r.layout,
                           status=r.status, median_ms=num(r.median_ms, ".4f"),
                           min_ms=num(min(r.times_ms) if r.times_ms and r.median_ms else None, ".4f"),
                           speedup_vs_eager_nchw=num(base / r.median_ms if base and r.median_ms else None, ".4f"),
                           saved_bytes=r.saved_bytes if r.saved_bytes is not None else "",
                           peak_mem_bytes=r.peak_mem_bytes if r.peak_mem_bytes is not None else "",
                           img_per_s=num(r.img_per_s, ".2f"), batch=r.batch, flops=r.flops or "",
                           bytes=r.bytes or "", gflops_per_s=num(r.gflops_per_s, ".4g"), reps=len(r.times_ms),
                           gemm_gflops=num(ceil.get("gemm_gflops", {}).get(r.dtype), ".1f"),
                           copy_gbs=num(ceil.get("copy_gbs"), ".1f"), fma_gflops=num(ceil.get("fma_gflops"), ".1f"),
                           shape=r.shape, timer=r.timer, first_call_s=num(r.first_call_s, ".4g"),
                           floor_bytes=r.floor_bytes or "", gb_per_s=num(r.gb_per_s, ".4g"),
                           floor_ms=num(r.floor_ms, ".6g"), frac_floor=num(r.frac_floor, ".4g"),
                           floor_fma_ms=num(r.floor_fma_ms, ".6g"), frac_floor_fma=num(r.frac_floor_fma, ".4g"),
                           note=r.note, **{k: meta[k] for k in ("device", "threads", "torch", "date", "command",
                                                                "triton", "tune")})
                w.writerow([row[k] for k in CSV_FIELDS])


def _get(results: List[Result], op, shape, dtype, mode, variant) -> Optional[Result]:
    return next((r for r in results if (r.op, r.shape, r.dtype, r.mode, r.variant) == (op, shape, dtype, mode, variant)
                 and r.median_ms), None)


def target_ratios(results: List[Result]) -> dict:
    """The target rows' figures for every fused variant measured there (keys as gpu_check.sh prints them)."""
    out = {}
    fused = list(dict.fromkeys(r.variant for r in results if r.variant.startswith("fused")))

    def ratio(r, *row):
        b = _get(results, *row)
        return b.median_ms / r.median_ms if b else None

    for f in fused:
        row = ("dw_block", "1536/20", "bf16", "eval")
        r = _get(results, *row, f)
        if r:
            out[f"dw_eval_bf16_1536/{f}"] = dict(
                ms=r.median_ms, frac_floor=r.frac_floor, frac_floor_fma=r.frac_floor_fma,
                vs_eager_nchw=ratio(r, *row, "eager_nchw"),
                vs_compile_max_autotune=ratio(r, *row, "torch_compile_max_autotune"),
                vs_compile_default=ratio(r, *row, "torch_compile"))
        row = ("mixer_layer", "1536/20", "bf16", "train")
        r = _get(results, *row, f)
        if r:
            out[f"layer_train_bf16_1536/{f}"] = dict(
                ms=r.median_ms, frac_floor=r.frac_floor, vs_eager_nchw=ratio(r, *row, "eager_nchw"),
                vs_eager_cl=ratio(r, *row, "eager_channels_last"))
    return out


def winners(results: List[Result]) -> dict:
    """Per op, triton vs cuda: the geometric mean of t_triton / t_cuda over the rows both measured
    (dw_block: the dw_block rows; conv_act_bn: the pointwise rows)."""
    gpu = [b for b in ("triton", "cuda") if any(r.variant == f"fused_{b}" and r.median_ms for r in results)]
    if len(gpu) < 2:
        return {op: dict(winner=gpu[0] if gpu else None, reason="only one GPU backend measured" if gpu
                         else "no GPU backend measured") for op in ("dw_block", "conv_act_bn")}
    out = {}
    for op, case_op in (("dw_block", "dw_block"), ("conv_act_bn", "pointwise")):
        ratios = []
        for r in results:
            if r.op == case_op and r.variant == "fused_triton" and r.median_ms:
                c = _get(results, case_op, r.shape, r.dtype, r.mode, "fused_cuda")
                if c:
                    ratios.append(r.median_ms / c.median_ms)
        if ratios:
            g = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            out[op] = dict(winner="cuda" if g > 1 else "triton", geomean_t_triton_over_t_cuda=g, rows=len(ratios))
        else:
            out[op] = dict(winner=None, reason="no row measured both")
    return out


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and v == v else "-"


def _rate(gflops) -> str:
    if gflops is None:
        return "-"
    return f"{gflops / 1e3:.1f} TFLOP/s" if gflops >= 1e3 else f"{gflops:.1f} GFLOP/s"


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _variant_colors(variants: List[str]) -> Dict[str, tuple]:
    import matplotlib
    fixed = {"eager_nchw": "0.55", "eager_channels_last": "0.75", "torch_compile": "#4c72b0",
             "torch_compile_max_autotune": "#8172b3", "torch_compile_freezing": "#64b5cd",
             "onnxruntime": "#937860", "openvino": "#da8bc3"}
    fused_cmap = matplotlib.colormaps["autumn"]
    fused = [v for v in variants if v not in fixed]
    out = {v: fixed[v] for v in variants if v in fixed}
    for i, v in enumerate(fused):
        out[v] = ["#dd4444", "#ee9922", "#55a868", "#c44e52"][i] if i < 4 else fused_cmap(i / max(1, len(fused)))
    return out


def plot_speedups(results: List[Result], path: str, title: str = ""):
    """One panel per case (and dtype): for each mode, a bar per variant, speed-up vs eager NCHW. None (and
    a log line) when --variants left out eager_nchw: there is then no bar to draw."""
    plt = _plt()
    if plt is None:
        return None
    if not any(_base_ms(rs) for rs in _groups(results).values()):
        _log("[bench] speed-up plot skipped: no eager_nchw result to take the speed-ups against")
        return None
    cases: Dict[tuple, Dict[str, List[Result]]] = {}
    for (case, dt, mode), rs in _groups(results).items():
        cases.setdefault((case, dt), {})[mode] = rs
    variants = list(dict.fromkeys(r.variant for r in results))
    colors = _variant_colors(variants)
    ncol = min(3, len(cases))
    nrow = math.ceil(len(cases) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow + 0.8), squeeze=False)
    width = 0.8 / max(1, len(variants))
    n_fused = sum(v.startswith("fused") for v in variants)
    for ax, ((case, dt), modes) in zip(axes.flat, cases.items()):
        ymax = 1.0
        for i, v in enumerate(variants):
            xs, ys = [], []
            for j, rs in enumerate(modes.values()):
                base, r = _base_ms(rs), next((r for r in rs if r.variant == v and r.median_ms), None)
                if base and r:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(base / r.median_ms)
            if not xs:
                continue
            bars = ax.bar(xs, ys, width, label=v, color=colors[v])
            ymax = max(ymax, max(ys))
            if v.startswith("fused"):
                for b, y in zip(bars, ys):
                    ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom",
                            fontsize=7 if n_fused == 1 else 6, rotation=0 if n_fused == 1 else 90)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(0, ymax * (1.15 if n_fused == 1 else 1.3))
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(list(modes), fontsize=8)
        ax.set_title(f"{case} [{dt}]", fontsize=9)
        ax.set_ylabel("speed-up vs eager NCHW", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.8 / (3.6 * nrow + 0.8), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roofline(results: List[Result], ceil: dict, path: str, title: str = ""):
    """Achieved FLOP/s (counted FLOPs / median time) against arithmetic intensity (counted FLOPs / floor
    bytes), one panel per mode, under the measured GEMM and copy ceilings of each dtype."""
    plt = _plt()
    if plt is None:
        return None
    pts = [r for r in results if r.median_ms and r.flops and r.bytes]
    if not pts:
        return None
    modes = list(dict.fromkeys(r.mode for r in pts))
    variants = list(dict.fromkeys(r.variant for r in pts))
    ops = list(dict.fromkeys(r.op for r in pts))
    dtypes = list(dict.fromkeys(r.dtype for r in pts))
    colors = _variant_colors(variants)
    markers = dict(zip(ops, "osD^vP*Xh<>"))
    copy_gbs = ceil["copy_gbs"]
    ncol = 2 if len(modes) > 1 else 1
    nrow = math.ceil(len(modes) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.6 * ncol, 4.2 * nrow + 0.9), squeeze=False, sharey=True)
    for ax, mode in zip(axes.flat, modes):
        rs = [r for r in pts if r.mode == mode]
        ai = [r.flops / r.bytes for r in rs]
        lo, hi = min(ai) / 3, max(ai) * 3
        for dt, gemm in ceil["gemm_gflops"].items():
            if not any(r.dtype == dt for r in rs):
                continue
            xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
            ax.plot(xs, [min(gemm, copy_gbs * x) for x in xs], "k-" if dt == dtypes[0] else "k--", lw=1)
            ax.text(hi, gemm, f"{dt} GEMM {gemm:.0f} GFLOP/s", ha="right", va="bottom", fontsize=7)
        ax.text(lo * 1.1, copy_gbs * lo * 1.1, f"copy {copy_gbs:.1f} GB/s", fontsize=7, va="bottom")
        for r in rs:  # the first dtype filled, any other hollow
            first = r.dtype == dtypes[0]
            ax.scatter(r.flops / r.bytes, r.gflops_per_s, marker=markers[r.op], s=28, zorder=3,
                       facecolors=colors[r.variant] if first else "none",
                       edgecolors="k" if first else colors[r.variant], linewidths=0.3 if first else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{mode} ({DIRECTION.get(mode, '')})", fontsize=9)
        ax.set_xlabel("arithmetic intensity (FLOP / floor byte)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    for ax in list(axes.flat)[len(modes):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("achieved GFLOP/s (counted FLOPs)", fontsize=8)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colors[v], marker="s", ls="", label=v) for v in variants]
    handles += [Line2D([], [], color="0.3", marker=markers[o], ls="", label=o, markerfacecolor="none") for o in ops]
    if len(dtypes) > 1:
        handles += [Line2D([], [], color="0.3", marker="o", ls="", label=f"{dtypes[0]}: filled, solid roof"),
                    Line2D([], [], color="0.3", marker="o", ls="", markerfacecolor="none",
                           label=f"{', '.join(dtypes[1:])}: hollow, dashed roof")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title + "\nroofline: measured GEMM and copy ceilings; points: counted FLOPs / median time",
                     fontsize=9)
    fig.tight_layout(rect=(0, 0.9 / (4.2 * nrow + 0.9), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- main -------------------------------------------------------------------------------------------

def _csv_list(s: Optional[str]) -> List[str]:
    return [t.strip() for t in s.split(",") if t.strip()] if s else []


def resolve_backends(spec: str, device: str, log=_log) -> List[str]:
    """The fused backends to measure: "auto" = every kernel backend built for the device (CPU: cpu; CUDA:
    triton, cuda). Named backends that cannot run here are reported and left out."""
    from . import backends
    avail = backends.available_backends()
    if spec in ("auto", ""):
        names = ["cpu"] if device == "cpu" else ["triton", "cuda"]
        out = []
        for n in names:
            ok, why = avail.get(n, (False, "unknown backend"))
            if ok and device in backends.get_backend(n).devices:
                out.append(n)
            else:
                log(f"[bench] backend {n}: not measured ({why})")
        return out
    if spec == "none":
        return []
    out = []
    for n in _csv_list(spec):
        ok, why = avail.get(n, (False, f"unknown backend (known: {', '.join(avail)})"))
        if not ok:
            log(f"[bench] backend {n}: not measured ({why})")
            continue
        if n != "reference" and device not in backends.get_backend(n).devices:
            if n == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
                log("[bench] backend triton on the CPU: Triton's interpreter (very slow; use --tiny)")
            else:
                hint = " (the Triton interpreter needs TRITON_INTERPRET=1 set before start)" if n == "triton" else ""
                log(f"[bench] backend {n}: cannot run on {device} tensors{hint}; not measured")
                continue
        out.append(n)
    return out


def tune_autotuners(keep: Optional[int]) -> List[str]:
    """Keeps the first `keep` autotune configs of every Triton kernel of the package (compile-time budget:
    autotuning compiles every config once per new key, and k=9 kernels take seconds each)."""
    if keep is None:
        return []
    try:
        from triton.runtime.autotuner import Autotuner
        from .triton import conv_act_bn, dw_block
    except Exception:  # noqa: BLE001  (no Triton: nothing to trim)
        return []
    changed = []
    for mod in (dw_block, conv_act_bn):
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner) and len(obj.configs) > keep:
                obj.configs = obj.configs[:keep]
                changed.append(name)
    return changed


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m convmixer_kernels bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="the CUDA profile on the CPU (--device cpu --tiny): "
                                                           "checks the GPU code path")
    ap.add_argument("--cases", default=None,
                    help="comma list of: dw, pw, stem, layer, model, model768, model1536 "
                         "(default: CPU dw,pw,stem,layer,model; CUDA dw,pw,layer)")
    ap.add_argument("--shapes", default=None, help=f"block shapes, comma list of: {', '.join(SHAPES)} "
                                                   "(default: CPU cpu; CUDA 1536/20,768/32)")
    ap.add_argument("--modes", default=None, help="comma list of: eval, train, train_fwd, train_bwd (default: CPU "
                                                  "all four for dw/pw/stem, eval,train for the layer and models; "
                                                  "CUDA eval,train)")
    ap.add_argument("--backends", default="auto", help="fused backends, comma list, 'auto' (every kernel backend "
                                                       "built for the device) or 'none'")
    ap.add_argument("--variants", default=None, help="keep only these variants, comma list (default: all)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default: fp32 on the CPU, "
                                                   "bf16,fp16 on CUDA)")
    ap.add_argument("--timer", default=None, choices=("call", "do_bench"),
                    help="call: one timed call per repetition; do_bench: triton.testing.do_bench per round "
                         "(default: CPU call, CUDA do_bench)")
    ap.add_argument("--reps", "--rounds", dest="reps", type=int, default=None,
                    help="interleaved repetitions (--timer call) or rounds (--timer do_bench) per variant "
                         "(default: CPU 7, CUDA 2)")
    ap.add_argument("--model-reps", type=int, default=None, help="repetitions for the layer/model cases "
                                                                 "(default: --reps)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (default 2 on "
                                                             "the CPU, 1 on CUDA)")
    ap.add_argument("--rep-ms", type=float, default=100, help="--timer do_bench: ms per variant, split over the "
                                                              "rounds (default 100)")
    ap.add_argument("--warmup-ms", type=float, default=25, help="--timer do_bench: do_bench's warm-up per round")
    ap.add_argument("--settle-ms", type=float, default=None,
                    help="pause before each timed call, untimed (default: 250 on the CPU when a peer runtime is "
                         "among the variants, whose spinning threads slow the next call; otherwise 0)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (the "
                                                              "torch_compile_freezing peer included)")
    ap.add_argument("--peers", default="auto", help="CPU inference runtimes in the eval rows, comma list of "
                    "torch_compile_freezing, onnxruntime, openvino, or 'auto' (CPU: all three; CUDA: none) or "
                    "'none'")
    ap.add_argument("--compile-modes", default=None, help="torch.compile modes, comma list (default: 'default' "
                                                          "on the CPU, 'default,max-autotune' on CUDA)")
    ap.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    ap.add_argument("--compile-rows", default=None, choices=("targets", "all", "none"),
                    help="rows that get the torch.compile variants (default: CPU all; CUDA targets: the two "
                         "target rows)")
    ap.add_argument("--subprocess-variants", default="auto",
                    help="variants measured in a child process under --compile-timeout-s, comma list, 'compile' "
                         "(every torch.compile variant) or 'none' (default: CUDA compile, CPU none)")
    ap.add_argument("--compile-timeout-s", type=float, default=150, help="wall-clock cap of one child process")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting new measurements after this (0: none)")
    ap.add_argument("--tune", default="all", help="'all', or keep the first N autotune configs of each Triton kernel")
    ap.add_argument("--fused-layouts", default="channels_last", help="layouts of the fused variants: "
                    "channels_last (fused_<backend>) and/or nchw (fused_<backend>_nchw)")
    ap.add_argument("--gpu-batch", type=int, default=64, help="CUDA: batch of every case (default 64)")
    ap.add_argument("--model-batch", type=int, default=None, help="batch of the model cases (default: CPU 64 "
                                                                  "for ConvMixer-256/8, 2 at 224 px; CUDA --gpu-batch)")
    ap.add_argument("--op-shape", default=None, help="N,C,H,W of the block cases (dw, pw, layer; the stem "
                                                     "outputs C channels at HxW)")
    ap.add_argument("--kernel-size", type=int, default=None, help="depthwise kernel of the block cases "
                                                                  "(default: the shape's)")
    ap.add_argument("--patch", type=int, default=None, help="patch of the stem case (default: the shape's)")
    ap.add_argument("--act", default=None, help="activation of the block cases: gelu, gelu_tanh, relu "
                                                "(default: the shape's)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (checks the code path, fast)")
    ap.add_argument("--out", default="bench_out", help="directory for the CSV, the JSON and the plots")
    ap.add_argument("--no-plots", action="store_true", help="write no PNG")
    ap.add_argument("--verbose", action="store_true", help="tracebacks of failing variants")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # the child process: one variant
    return ap


def settings(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Settings:
    """The run's settings from the parsed options and the profile's defaults; ValueError on a bad option.
    Needs no device: tests resolve the CUDA defaults on a CPU-only machine."""
    dev = "cpu" if args.dry_run else args.device
    prof_name = "cuda" if args.dry_run or dev == "cuda" else "cpu"
    prof = PROFILES[prof_name]
    tiny = args.tiny or args.dry_run
    reps = args.reps if args.reps is not None else prof["reps"]
    model_reps = args.model_reps if args.model_reps is not None else reps
    warmup = args.warmup if args.warmup is not None else prof["warmup"]
    dtypes = _csv_list(args.dtypes) or list(prof["dtypes"])
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown {d!r} (expected {', '.join(DTYPES)})")
    if args.no_compile or (args.dry_run and not args.compile_modes):
        compile_modes = []
    else:
        compile_modes = _csv_list(args.compile_modes) or list(prof["compile_modes"])
    compile_names = [compile_variant_name(cm) for cm in compile_modes]
    sub = args.subprocess_variants
    if sub == "auto":
        sub = "compile" if prof_name == "cuda" else "none"
    subprocess_variants = [] if sub == "none" else (compile_names if sub == "compile" else _csv_list(sub))
    fused_layouts = _csv_list(args.fused_layouts)
    for lay in fused_layouts:
        if lay not in ("channels_last", "nchw"):
            raise ValueError(f"--fused-layouts: unknown {lay!r} (expected channels_last, nchw)")
    op_shape = tuple(int(v) for v in args.op_shape.split(",")) if args.op_shape else None
    if op_shape and len(op_shape) != 4:
        raise ValueError("--op-shape takes N,C,H,W")
    if args.act is not None and args.act not in ("gelu", "gelu_tanh", "relu"):
        raise ValueError(f"--act: unknown {args.act!r} (expected gelu, gelu_tanh, relu)")
    from .cpu_peers import PEERS
    if args.peers == "auto":
        peers = list(PEERS) if prof_name == "cpu" else []
    else:
        peers = [] if args.peers == "none" else _csv_list(args.peers)
        for p in peers:
            if p not in PEERS:
                raise ValueError(f"--peers: unknown {p!r} (expected {', '.join(PEERS)}, auto or none)")
        if peers and dev != "cpu":
            raise ValueError("--peers: the peers are CPU runtimes (use --device cpu)")
    if not compile_modes:
        peers = [p for p in peers if p != "torch_compile_freezing"]
    keys = _csv_list(args.cases) or list(prof["keys"])
    for k in keys:
        if k not in BLOCK_KEYS + MODEL_KEYS:
            raise ValueError(f"--cases: unknown {k!r} (expected {', '.join(BLOCK_KEYS + MODEL_KEYS)})")
    shapes = _csv_list(args.shapes) or list(prof["shapes"])
    cases: List[Case] = []
    for i, s in enumerate(shapes):
        by_key = build_cases(dev, tiny, args.gpu_batch, op_shape, args.kernel_size, args.patch, args.act,
                             args.model_batch, shape=s)
        cases += [by_key[k] for k in keys if k in BLOCK_KEYS or (i == 0 and k in MODEL_KEYS)]
    modes = _csv_list(args.modes) or list(prof["modes"])
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown {m!r} (expected {', '.join(MODES)})")
    return Settings(dev, keys, modes, dtypes, reps, model_reps, warmup, compile_modes, fused_layouts, cases,
                    profile=prof_name, shapes=shapes, timer=args.timer or prof["timer"], rep_ms=args.rep_ms,
                    warmup_ms=args.warmup_ms, compile_backend=args.compile_backend,
                    compile_rows=args.compile_rows or prof["compile_rows"], subprocess_variants=subprocess_variants,
                    compile_timeout_s=args.compile_timeout_s, variants=_csv_list(args.variants), tiny=tiny,
                    peers=peers, settle_ms=args.settle_ms,
                    dtype_modes={} if args.dtypes else dict(prof.get("dtype_modes", {})),
                    verbose=args.verbose, argv=list(argv or []))


def _child(st: Settings, spec: str, log=_log) -> int:
    """--single: one variant of one (case, dtype, mode), measured here, printed as SINGLE_JSON."""
    key, shape, dtype_name, mode, name = json.loads(spec)
    st.subprocess_variants, st.compile_rows, st.deadline = [], "all", None
    case = next((c for c in st.cases if c.key == key and c.shape == shape), None)
    if case is None:
        print(f"[bench] child: no case {key} at {shape}", file=sys.stderr)
        return 2
    b = name[len("fused_"):] if name.startswith("fused_") else ""
    fused = [b[:-len("_nchw")] if b.endswith("_nchw") else b] if b else []
    res = bench_case(case, [mode], dtype_name, st, fused, log, only=[name])
    if not res:
        print(f"[bench] child: no variant {name}", file=sys.stderr)
        return 2
    print("SINGLE_JSON " + json.dumps(asdict(res[0])), flush=True)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = make_parser()
    args = ap.parse_args(argv)
    try:
        st = settings(args, [a for a in argv])
    except ValueError as e:
        ap.error(str(e))
    dev, gpu = st.device, st.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("[bench] --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if st.compile_modes:
        from torch import _dynamo
        cfg = _dynamo.config
        for attr in ("recompile_limit", "cache_size_limit"):  # one compiled graph per case, mode and dtype
            if hasattr(cfg, attr):
                setattr(cfg, attr, max(getattr(cfg, attr), 64))
    tuned = tune_autotuners(None if args.tune == "all" else int(args.tune))
    log = _log
    if args.single:
        return _child(st, args.single, log)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    st.deadline = t_start + args.budget_s if args.budget_s else None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    meta = dict(device=torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})",
                threads=torch.get_num_threads(), torch=torch.__version__, triton=triton_version, tune=args.tune,
                date=time.strftime("%Y-%m-%d"), command="python -m convmixer_kernels bench " + " ".join(argv))
    fused_backends = resolve_backends(args.backends, dev, log)
    log(f"[bench] device={meta['device']} threads={meta['threads']} torch={meta['torch']} triton={triton_version} "
        f"profile={st.profile}{' (dry run)' if args.dry_run else ''} tiny={st.tiny} timer={st.timer} reps={st.reps} "
        f"(layer/model {st.model_reps}) warmup={st.warmup} dtypes={','.join(st.dtypes)} "
        f"backends={','.join(fused_backends) or 'none'} compile={','.join(st.compile_modes) or 'off'}"
        f" peers={','.join(st.peers) or 'none'}"
        f"{' (child: ' + ','.join(st.subprocess_variants) + ')' if st.subprocess_variants and st.compile_modes else ''}"
        f" tune={args.tune}{' (' + str(len(tuned)) + ' autotuners trimmed)' if tuned else ''}"
        f"{f' budget={args.budget_s:.0f}s' if args.budget_s else ''}")
    ceil = measure_ceilings(dev, st.dtypes, st.tiny)
    log(f"[bench] ceilings: copy {ceil['copy_gbs']:.1f} GB/s (read + write); GEMM ({ceil.get('gemm_source', '')}) "
        + ", ".join(f"{d} {_rate(g)}" for d, g in ceil["gemm_gflops"].items())
        + f"; fp32 FMA {_rate(ceil['fma_gflops'])} ({ceil.get('fma_source') or ceil.get('fma_error', '')})"
        + (" [--tiny: small shapes, not a measurement]" if st.tiny else ""))
    units = [(case, d) for d in st.dtypes for case in st.cases]
    units.sort(key=lambda u: not any((u[0].op, u[0].shape, u[1], m) in TARGET_ROWS
                                     for m in st.case_modes(u[0], u[1])))  # targets first
    results: List[Result] = []
    csv_path = os.path.join(args.out, f"bench_{dev}.csv")
    for case, d in units:
        modes = st.case_modes(case, d)
        log(f"[bench] === {case.name} [{d}]  (t={time.time() - t_start:.0f}s)")
        rs = bench_case(case, modes, d, st, fused_backends, log)
        add_floors(rs, ceil)
        results += rs
        write_csv(results, csv_path, meta, ceil)  # after every case: a cut run keeps what it measured
    print(format_table(results), flush=True)
    ratios, win = target_ratios(results), winners(results)
    if st.profile == "cuda":
        log("\n[bench] target ratios:")
        for k, v in ratios.items():
            log(f"  {k}: " + ", ".join(f"{a}={_fmt(b, '.3f')}" for a, b in v.items()))
        log("[bench] measured winners (for backends.CUDA_WINNERS): "
            + json.dumps({op: w.get("winner") for op, w in win.items()}) + f"  detail: {json.dumps(win)}")
    json_path = os.path.join(args.out, f"bench_{dev}.json")
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, profile=st.profile, dry_run=args.dry_run, tiny=st.tiny, timer=st.timer,
                       ceilings=ceil, targets=ratios, winners=win, tuned=tuned,
                       seconds=round(time.time() - t_start, 1)), f, indent=1)
    pngs = []
    if not args.no_plots:
        title = f"{meta['device']}, {meta['threads']} threads, torch {meta['torch']}"
        pngs = [p for p in (plot_speedups(results, os.path.join(args.out, f"speedup_{dev}.png"), title),
                            plot_roofline(results, ceil, os.path.join(args.out, f"roofline_{dev}.png"), title)) if p]
    log(f"\n[bench] wrote {csv_path}, {json_path}" + "".join(f", {p}" for p in pngs)
        + f" in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":  # the child processes (run_child); `python -m convmixer_kernels bench` is the entry
    sys.exit(main())
