"""Microbenchmarks of every fused op and whole-model benchmarks, each backend against eager NCHW, eager
channels_last and torch.compile, timed in one process and interleaved (each repetition runs every
variant once, in turn), reported as medians and ratios, with the bytes each variant saves for the backward.

    python -m convmixer_kernels bench [--cases dw,pw,stem,layer,model] [--modes ...] [--backends cpu]
                                      [--dtypes fp32] [--reps N] [--out DIR] [--tiny]

Cases
  op     dw      the depthwise block x + BN(act(DWConv_k(x)))
         pw      the pointwise block BN(act(Conv1x1(x)))
         stem    the patch stem BN(act(Conv_p,stride p(img)))
  layer  layer   one mixer layer (dw then pw)
  model  model   ConvMixer-256/8 (k=9, p=2) on 32 px CIFAR-size images
         model768, model1536   ConvMixer-768/32 (k=7, p=7, ReLU) and ConvMixer-1536/20 (k=9, p=7, GELU) at
                 224 px: in the default set on CUDA only (on the CPU: --cases model768 runs it at batch 2)
  CPU shapes: the blocks at 32x256x16x16 (the stem: 32x3x32x32, p=2), ConvMixer-256/8 at batch 64.
  GPU shapes: the blocks at ConvMixer-1536/20's layer shape, --gpu-batch x 1536 x 32 x 32 (the stem:
  224 px, p=7); every model at batch --gpu-batch.

Modes (default: all four for the op cases, eval and train for the layer and the models)
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
  does not.

Variants (interleaved)
  eager_nchw, eager_channels_last, torch_compile (mode default, NCHW input),
  torch_compile_max_autotune (--compile-modes; default on CUDA only),
  fused_<backend> for each of --backends (default: every kernel backend built for the device: on the
  CPU "cpu", on CUDA "triton" and "cuda"), channels_last; --fused-layouts nchw,channels_last adds
  fused_<backend>_nchw. Triton on the CPU (its interpreter: very slow, --tiny) only when named in
  --backends and TRITON_INTERPRET=1 is set before the start. A variant that fails is reported (CSV
  status column) and the run goes on. The first run on a machine pays torch.compile's compile (cached
  by inductor for later runs; on CUDA max-autotune takes minutes per graph: --compile-modes default).

Timing: CPU: time.perf_counter around each call; CUDA: a device synchronize, then CUDA events around the
call (elapsed_time after the end event completes). Medians over --reps interleaved repetitions after
--warmup untimed calls (which include torch.compile's compile; its time is printed).

Reported per variant: median ms, speed-up vs eager NCHW, saved-activation bytes (training modes;
saved_tensors_hooks over one training forward, parameters and buffers excluded), on CUDA the peak memory
of one call (torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated
before the call's set-up: for train_bwd that includes the forward's saved tensors; CUDA graphs, which
max-autotune uses, allocate their pool at capture, in the warm-up, so theirs can read low), images/s
for the models, and achieved GFLOP/s against counted FLOPs. Writes bench_<device>.csv, speedup_<device>.png (bars)
and roofline_<device>.png (achieved FLOP/s vs arithmetic intensity under the GEMM and copy ceilings
measured in the same run) into --out.

FLOPs and bytes are counted, not measured: FLOPs of the convolutions/GEMMs only (forward 1x, backward 2x:
input and weight gradients; 1x where the input needs no gradient; activation/BN epilogues ignored);
bytes = the sum over the fused ops of every op input read once and every output written once
(forward: x, y; backward: dy, x, dx), weights included.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .convert import convert
from .reference import ConvMixerPaper, Residual, make_act

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("eval", "train", "train_fwd", "train_bwd")
TRAIN_MODES = ("train", "train_fwd", "train_bwd")
DIRECTION = {"eval": "forward", "train": "forward+backward", "train_fwd": "forward", "train_bwd": "backward"}
CASE_DEFAULT_MODES = {"op": MODES, "layer": ("eval", "train"), "model": ("eval", "train")}
CSV_FIELDS = ["case", "op", "kind", "dtype", "mode", "direction", "variant", "backend", "layout", "status",
              "median_ms", "min_ms", "speedup_vs_eager_nchw", "saved_bytes", "peak_mem_bytes", "img_per_s",
              "batch", "flops", "bytes", "gflops_per_s", "reps", "device", "threads", "torch", "date", "command",
              "gemm_gflops", "copy_gbs"]


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
    counts: Callable[[], Tuple[int, int, int, int]]  # (fwd FLOPs, bwd FLOPs, fwd elements, bwd elements)
    batch: int = 0


def _dw_counts(n, c, h, w, k, dx=True):
    a = n * c * h * w
    wts = c * k * k + c
    return 2 * k * k * a, (2 if dx else 1) * 2 * k * k * a, 2 * a + wts, (3 if dx else 2) * a + 2 * wts


def _cab_counts(n, cin, h, w, cout, p, dx=True):
    m = n * (h // p) * (w // p)
    kdim = cin * p * p
    x_el, y_el, wts = n * cin * h * w, m * cout, cout * kdim + cout
    f = 2 * m * kdim * cout
    return f, (2 if dx else 1) * f, x_el + y_el + wts, y_el + (2 if dx else 1) * x_el + 2 * wts


def _sum_counts(*cs):
    return tuple(sum(c[i] for c in cs) for i in range(4))


def _model_counts(n, dim, depth, k, p, img):
    hw = img // p
    stem = _cab_counts(n, 3, img, img, dim, p, dx=False)
    layer = _sum_counts(_dw_counts(n, dim, hw, hw, k), _cab_counts(n, dim, hw, hw, dim, 1))
    return _sum_counts(stem, *([layer] * depth))


def build_cases(device: str, tiny: bool = False, gpu_batch: int = 64, op_shape: Optional[tuple] = None,
                kernel_size: Optional[int] = None, patch: Optional[int] = None, act: str = "gelu",
                model_batch: Optional[int] = None) -> Dict[str, Case]:
    """Every case this benchmark knows, at the device's shapes (see the module docstring)."""
    gpu = device != "cpu"
    if tiny:
        n, dim, hw = 2, 16, 8
        k, p = kernel_size or 9, patch or 2
    elif gpu:
        n, dim, hw = gpu_batch, 1536, 32
        k, p = kernel_size or 9, patch or 7
    else:  # the shapes of issue #2
        n, dim, hw = 32, 256, 16
        k, p = kernel_size or 9, patch or 2
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

    shp = f"{n}x{dim}x{hw}x{hw}"
    cases = {
        "dw": Case("dw", f"dw_block {shp} k{k}", "dw_block", "op", lambda: dw_mod(dim, k, act), (n, dim, hw, hw),
                   True, lambda: _dw_counts(n, dim, hw, hw, k), n),
        "pw": Case("pw", f"pointwise {shp}", "pointwise", "op", lambda: pw_mod(dim, dim, 1, act), (n, dim, hw, hw),
                   True, lambda: _cab_counts(n, dim, hw, hw, dim, 1), n),
        "stem": Case("stem", f"stem {n}x3x{hw * p}x{hw * p} p{p} ->{dim}", "stem", "op",
                     lambda: pw_mod(3, dim, p, act), (n, 3, hw * p, hw * p), False,
                     lambda: _cab_counts(n, 3, hw * p, hw * p, dim, p, dx=False), n),
        "layer": Case("layer", f"mixer_layer {shp} k{k}", "mixer_layer", "layer",
                      lambda: nn.Sequential(dw_mod(dim, k, act), *pw_mod(dim, dim, 1, act)), (n, dim, hw, hw), True,
                      lambda: _sum_counts(_dw_counts(n, dim, hw, hw, k), _cab_counts(n, dim, hw, hw, dim, 1)), n),
    }
    # models: (key, op name, dim, depth, k, p, act, image size, batch)
    if tiny:
        models = [("model", "convmixer_256_8", 16, 2, 9, 2, "gelu", 16, 2),
                  ("model768", "convmixer_768_32", 16, 2, 7, 7, "relu", 28, 2),
                  ("model1536", "convmixer_1536_20", 16, 2, 9, 7, "gelu", 28, 2)]
    else:
        cifar_b, big_b = (gpu_batch, gpu_batch) if gpu else (64, 2)
        models = [("model", "convmixer_256_8", 256, 8, 9, 2, "gelu", 32, cifar_b),
                  ("model768", "convmixer_768_32", 768, 32, 7, 7, "relu", 224, big_b),
                  ("model1536", "convmixer_1536_20", 1536, 20, 9, 7, "gelu", 224, big_b)]
    for key, opname, d, depth, kk, pp, a, img, b in models:
        b = model_batch or b
        cases[key] = Case(
            key, f"{opname} b{b} {img}px k{kk} p{pp}" + ("" if a == "gelu" else f" {a}") + (" (tiny)" if tiny else ""),
            opname, "model",
            (lambda d=d, depth=depth, kk=kk, pp=pp, a=a, img=img: ConvMixerPaper(
                d, depth, kernel_size=kk, patch_size=pp, n_classes=10 if img == 32 else 1000, act=a)),
            (b, 3, img, img), False, (lambda b=b, d=d, depth=depth, kk=kk, pp=pp, img=img:
                                      _model_counts(b, d, depth, kk, pp, img)), b)
    return cases


def default_case_keys(device: str) -> List[str]:
    keys = ["dw", "pw", "stem", "layer", "model"]
    return keys + (["model768", "model1536"] if device != "cpu" else [])


# --- measurement helpers ----------------------------------------------------------------------------

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

    @property
    def img_per_s(self) -> Optional[float]:
        if self.kind == "model" and self.median_ms:
            return self.batch * 1e3 / self.median_ms
        return None

    @property
    def gflops_per_s(self) -> Optional[float]:
        return self.flops / self.median_ms / 1e6 if self.flops and self.median_ms else None


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


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {msg[0][:200] if msg else ''}"


def make_variants(eager: nn.Module, x: torch.Tensor, device: str, fused_backends: List[str],
                  compile_modes: List[str], fused_layouts: List[str], compile_backend: str = "inductor",
                  log=print) -> List[Variant]:
    cl = torch.channels_last
    out = [Variant("eager_nchw", "eager", "nchw", eager, x.clone()),
           Variant("eager_channels_last", "eager", "channels_last", copy.deepcopy(eager).to(memory_format=cl),
                   x.contiguous(memory_format=cl))]
    for cm in compile_modes:
        name = "torch_compile" if cm == "default" else "torch_compile_" + cm.replace("-", "_")
        try:
            kw = {} if cm == "default" or compile_backend != "inductor" else {"mode": cm}
            m = torch.compile(copy.deepcopy(eager), backend=compile_backend, **kw)
            out.append(Variant(name, "inductor" if cm == "default" else f"inductor-{cm}", "nchw", m, x.clone(),
                               compiled=True))
        except Exception as e:  # noqa: BLE001  (reported in the CSV, the run goes on)
            out.append(Variant(name, "inductor", "nchw", None, None, error=_err(e)))
    for b in fused_backends:
        for layout in fused_layouts:
            name = f"fused_{b}" if layout == "channels_last" else f"fused_{b}_nchw"
            try:
                m = convert(eager, backend=b)
                xv = x.clone()
                if layout == "channels_last":
                    m, xv = m.to(memory_format=cl), x.contiguous(memory_format=cl)
                out.append(Variant(name, b, layout, m, xv))
            except Exception as e:  # noqa: BLE001
                out.append(Variant(name, b, layout, None, None, error=_err(e)))
    for v in out:  # output memory format (for dy), from the eager module underneath
        if v.error:
            continue
        base = getattr(v.model, "_orig_mod", v.model)
        try:
            base.eval()
            with torch.no_grad():
                y = base(v.x)
            v.dy_format = (cl if y.dim() == 4 and not y.is_contiguous() and y.is_contiguous(memory_format=cl)
                           else torch.contiguous_format)
        except Exception as e:  # noqa: BLE001
            v.error = _err(e)
            log(f"    {v.name}: {v.error}")
    return out


def _step(v: Variant, mode: str, dy: torch.Tensor, input_grad: bool, device: str):
    """(setup, fn) for one variant and mode; setup runs untimed before every timed fn."""
    model, x = v.model, v.x
    model.train(mode != "eval")
    x.requires_grad_(mode != "eval" and input_grad)
    params = list(model.parameters())
    mark = (getattr(torch.compiler, "cudagraph_mark_step_begin", None)
            if v.compiled and device == "cuda" else None)

    def fwd():
        if mark is not None:
            mark()
        return model(x)

    def clear():
        for p in params:
            p.grad = None
        x.grad = None

    if mode == "eval":
        def fn():
            with torch.no_grad():
                return fwd()
        return None, fn
    if mode == "train":
        def fn():
            fwd().backward(dy)
        return clear, fn
    if mode == "train_fwd":
        return clear, fwd
    if mode == "train_bwd":
        state = {}

        def setup():
            clear()
            state["y"] = fwd()

        def fn():
            state.pop("y").backward(dy)
        return setup, fn
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def bench_mode(case: Case, mode: str, dtype_name: str, variants: List[Variant], dy0: torch.Tensor, device: str,
               reps: int, warmup: int, log=print) -> List[Result]:
    fwd_f, bwd_f, fwd_el, bwd_el = case.counts()
    esize = torch.finfo(DTYPES[dtype_name]).bits // 8
    flops = {"eval": fwd_f, "train_fwd": fwd_f, "train_bwd": bwd_f, "train": fwd_f + bwd_f}[mode]
    nbytes = esize * {"eval": fwd_el, "train_fwd": fwd_el, "train_bwd": bwd_el, "train": fwd_el + bwd_el}[mode]
    results: Dict[str, Result] = {}
    ready: Dict[str, tuple] = {}
    for v in variants:
        res = Result(case.name, mode, v.name, op=case.op, kind=case.kind, dtype=dtype_name, backend=v.backend,
                     layout=v.layout, batch=case.batch, flops=flops, bytes=nbytes)
        results[v.name] = res
        if v.error:
            res.status = v.error
            continue
        try:
            setup, fn = _step(v, mode, dy0.contiguous(memory_format=v.dy_format), case.input_grad, device)
            t0 = time.perf_counter()
            for _ in range(max(1, warmup)):
                if setup:
                    setup()
                out = fn()
                del out
            _sync(device)
            note = f" (warm-up incl. compile {time.perf_counter() - t0:.1f}s)" if v.compiled else ""
            if device == "cuda":  # peak memory of one call, over what was allocated before its set-up
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
            ready[v.name] = (setup, fn)
            log(f"    ready {v.name}{note}")
        except Exception as e:  # noqa: BLE001
            res.status = _err(e)
            log(f"    {v.name}: {res.status}")
            if os.environ.get("CONVMIXER_BENCH_DEBUG"):
                traceback.print_exc()
    for r in range(reps):
        for name, (setup, fn) in list(ready.items()):  # interleaved: every variant once per repetition
            try:
                if setup:
                    setup()
                results[name].times_ms.append(_timed_ms(fn, device))
            except Exception as e:  # noqa: BLE001
                results[name].status = _err(e)
                del ready[name]
                log(f"    {name}: {results[name].status}")
        log(f"    rep {r + 1}/{reps}: " + "  ".join(f"{n}={results[n].times_ms[-1]:.2f}ms" for n in ready))
    for res in results.values():
        if res.status == "ok" and res.times_ms:
            res.median_ms = statistics.median(res.times_ms)
        elif res.status == "ok":
            res.status = "error: no timed repetition"
    return list(results.values())


def bench_case(case: Case, modes: List[str], dtype_name: str, device: str, reps: int, warmup: int,
               fused_backends: List[str], compile_modes: List[str], fused_layouts: List[str],
               compile_backend: str = "inductor", log=print) -> List[Result]:
    """Every mode of one case and dtype; the variants are built once and shared by the modes."""
    if compile_modes:
        from torch import _dynamo
        _dynamo.reset()  # a fresh compile cache per case: no recompile limit, no dynamic shapes
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    eager = _randomize_bn(case.build()).to(device=device, dtype=dtype)
    for m in eager.modules():  # BN parameters and running statistics stay fp32 (the AMP convention)
        if isinstance(m, nn.BatchNorm2d):
            m.float()
    x = torch.randn(case.input_shape, device=device, dtype=dtype)
    with torch.no_grad():
        eager.eval()
        dy0 = torch.randn_like(eager(x))
    variants = make_variants(eager, x, device, fused_backends, compile_modes, fused_layouts, compile_backend, log)
    results = []
    for mode in modes:
        t0 = time.perf_counter()
        log(f"[bench] {case.name} {dtype_name} [{mode}]")
        results += bench_mode(case, mode, dtype_name, variants, dy0, device, reps, warmup, log)
        log(f"    ({time.perf_counter() - t0:.1f}s)")
    if any(m in TRAIN_MODES for m in modes):
        for v in variants:
            if v.error:
                continue
            try:
                v.model.train()
                v.x.requires_grad_(case.input_grad)
                if v.compiled and device == "cuda" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                    torch.compiler.cudagraph_mark_step_begin()
                saved = saved_activation_bytes(v.model, v.x)
            except Exception as e:  # noqa: BLE001
                log(f"    saved bytes of {v.name}: {_err(e)}")
                saved = None
            for r in results:
                if r.variant == v.name and r.mode in TRAIN_MODES and r.status == "ok":
                    r.saved_bytes = saved
    del variants
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def measure_ceilings(device: str, dtype: torch.dtype = torch.float32) -> dict:
    """The two ceilings the floors are counted against, measured here: the GEMM rate in `dtype` (CPU: a
    16384 x 256 x 256 product, the pointwise conv's shape; CUDA: 8192^3) and copy bandwidth (bytes read
    + written; CPU: 32 MiB, past the L2 of one core pair; CUDA: 1 GiB)."""
    if device == "cuda":
        m, k, n, nbytes, reps = 8192, 8192, 8192, 1 << 30, 10
    else:
        m, k, n, nbytes, reps = 16384, 256, 256, 32 << 20, 15
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    big = torch.randn(nbytes // 4, device=device)

    def med(fn):
        for _ in range(3):
            fn()
        return statistics.median(_timed_ms(fn, device) for _ in range(reps)) / 1e3

    t_mm = med(lambda: torch.mm(a, b))
    t_cp = med(lambda: big.clone())
    return {"gemm_gflops": 2 * m * k * n / t_mm / 1e9, "copy_gbs": 2 * big.numel() * 4 / t_cp / 1e9}


# --- reports ----------------------------------------------------------------------------------------

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


def format_table(results: List[Result]) -> str:
    """Grouped by case (and dtype): one row per mode and variant, then a summary of the best fused
    variant against eager NCHW and against the best of the other baselines."""
    lines = []
    cuda = any(r.peak_mem_bytes is not None for r in results)
    models = any(r.kind == "model" for r in results)
    cases: Dict[tuple, Dict[str, List[Result]]] = {}
    for (case, dt, mode), rs in _groups(results).items():
        cases.setdefault((case, dt), {})[mode] = rs
    head = (f"  {'mode':<10}{'variant':<28}{'median ms':>11}{'vs eager':>10}{'GFLOP/s':>9}{'saved MB':>10}"
            f"{'saved %':>9}" + (f"{'peak MB':>10}" if cuda else "") + (f"{'img/s':>9}" if models else ""))
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
                sp = f"{base / r.median_ms:9.2f}x" if base else f"{'-':>10}"
                gf = f"{r.gflops_per_s:9.1f}" if r.gflops_per_s else f"{'-':>9}"
                saved = f"{r.saved_bytes / 2**20:10.1f}" if r.saved_bytes is not None else f"{'-':>10}"
                pct = f"{100 * r.saved_bytes / bsaved:8.0f}%" if r.saved_bytes is not None and bsaved else f"{'-':>9}"
                peak = (f"{r.peak_mem_bytes / 2**20:10.1f}" if r.peak_mem_bytes is not None else f"{'-':>10}") \
                    if cuda else ""
                ips = (f"{r.img_per_s:9.1f}" if r.img_per_s else f"{'-':>9}") if models else ""
                lines.append(f"  {m:<10}{r.variant:<28}{r.median_ms:11.2f}{sp}{gf}{saved}{pct}{peak}{ips}")
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
        lines.append(f"  {case:<{cw}}{dt:<6}{mode:<10}{f.variant:<22}{f.median_ms:9.2f}"
                     + (f"{base / f.median_ms:9.2f}x" if base else f"{'-':>10}")
                     + (f"{o.median_ms / f.median_ms:14.2f}x  {o.variant}" if o else f"{'-':>15}"))
    return "\n".join(lines)


def write_csv(results: List[Result], path: str, meta: dict, ceilings: Dict[str, dict]):
    def num(v, spec):
        return format(v, spec) if v is not None else ""

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for (case, dt, mode), rs in _groups(results).items():
            base = _base_ms(rs)
            for r in rs:
                c = ceilings.get(r.dtype, {})
                row = dict(case=r.case, op=r.op, kind=r.kind, dtype=r.dtype, mode=r.mode,
                           direction=DIRECTION.get(r.mode, ""), variant=r.variant, backend=r.backend, layout=r.layout,
                           status=r.status, median_ms=num(r.median_ms, ".4f"),
                           min_ms=num(min(r.times_ms) if r.times_ms and r.median_ms else None, ".4f"),
                           speedup_vs_eager_nchw=num(base / r.median_ms if base and r.median_ms else None, ".4f"),
                           saved_bytes=r.saved_bytes if r.saved_bytes is not None else "",
                           peak_mem_bytes=r.peak_mem_bytes if r.peak_mem_bytes is not None else "",
                           img_per_s=num(r.img_per_s, ".2f"), batch=r.batch, flops=r.flops or "",
                           bytes=r.bytes or "", gflops_per_s=num(r.gflops_per_s, ".4g"), reps=len(r.times_ms),
                           gemm_gflops=num(c.get("gemm_gflops"), ".1f"), copy_gbs=num(c.get("copy_gbs"), ".1f"),
                           **{k: meta[k] for k in ("device", "threads", "torch", "date", "command")})
                w.writerow([row[k] for k in CSV_FIELDS])


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
             "torch_compile_max_autotune": "#8172b3"}
    fused_cmap = matplotlib.colormaps["autumn"]
    fused = [v for v in variants if v not in fixed]
    out = {v: fixed[v] for v in variants if v in fixed}
    for i, v in enumerate(fused):
        out[v] = ["#dd4444", "#ee9922", "#55a868", "#c44e52"][i] if i < 4 else fused_cmap(i / max(1, len(fused)))
    return out


def plot_speedups(results: List[Result], path: str, title: str = ""):
    """One panel per case (and dtype): for each mode, a bar per variant, speed-up vs eager NCHW."""
    plt = _plt()
    if plt is None:
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


def plot_roofline(results: List[Result], ceilings: Dict[str, dict], path: str, title: str = ""):
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
    ncol = 2 if len(modes) > 1 else 1
    nrow = math.ceil(len(modes) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.6 * ncol, 4.2 * nrow + 0.9), squeeze=False, sharey=True)
    for ax, mode in zip(axes.flat, modes):
        rs = [r for r in pts if r.mode == mode]
        ai = [r.flops / r.bytes for r in rs]
        lo, hi = min(ai) / 3, max(ai) * 3
        for dt, c in ceilings.items():
            if not any(r.dtype == dt for r in rs):
                continue
            xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
            roof = [min(c["gemm_gflops"], c["copy_gbs"] * x) for x in xs]
            ax.plot(xs, roof, "k-" if dt == dtypes[0] else "k--", lw=1)
            ax.text(hi, c["gemm_gflops"], f"{dt} GEMM {c['gemm_gflops']:.0f} GFLOP/s", ha="right", va="bottom",
                    fontsize=7)
        c0 = ceilings.get(dtypes[0])
        if c0:
            ax.text(lo * 1.1, c0["copy_gbs"] * lo * 1.1, f"copy {c0['copy_gbs']:.1f} GB/s", fontsize=7,
                    va="bottom")
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

def _csv_list(s: str) -> List[str]:
    return [t.strip() for t in s.split(",") if t.strip()] if s else []


def resolve_backends(spec: str, device: str, log=print) -> List[str]:
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


@dataclass
class Settings:
    device: str
    keys: List[str]
    modes: List[str]          # empty: each case's default modes
    dtypes: List[str]
    reps: int
    model_reps: int
    warmup: int
    compile_modes: List[str]
    fused_layouts: List[str]
    cases: Dict[str, Case]


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m convmixer_kernels bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default=None,
                    help="comma list of: dw, pw, stem, layer, model, model768, model1536 "
                         "(default: dw,pw,stem,layer,model; on CUDA also model768,model1536)")
    ap.add_argument("--modes", default=None, help="comma list of: eval, train, train_fwd, train_bwd (default: all "
                                                  "four for dw/pw/stem, eval,train for the layer and models)")
    ap.add_argument("--backends", default="auto", help="fused backends, comma list, 'auto' (every kernel backend "
                                                       "built for the device) or 'none'")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default: fp32 on the CPU, bf16 "
                                                   "on CUDA)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant, interleaved "
                                                           "(default: 7 on the CPU, 20 on CUDA)")
    ap.add_argument("--model-reps", type=int, default=None, help="repetitions for the layer/model cases "
                                                                 "(default: --reps)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (default 2 on "
                                                             "the CPU, 3 on CUDA)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--compile-modes", default=None, help="torch.compile modes, comma list (default: 'default' "
                                                          "on the CPU, 'default,max-autotune' on CUDA)")
    ap.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    ap.add_argument("--fused-layouts", default="channels_last", help="layouts of the fused variants: "
                    "channels_last (fused_<backend>) and/or nchw (fused_<backend>_nchw)")
    ap.add_argument("--gpu-batch", type=int, default=64, help="CUDA: batch of every case (default 64)")
    ap.add_argument("--model-batch", type=int, default=None, help="batch of the model cases (default: CPU 64 "
                                                                  "for ConvMixer-256/8, 2 at 224 px; CUDA --gpu-batch)")
    ap.add_argument("--op-shape", default=None, help="N,C,H,W of the block cases (dw, pw, layer; the stem "
                                                     "outputs C channels at HxW)")
    ap.add_argument("--kernel-size", type=int, default=None, help="depthwise kernel of the block cases (9)")
    ap.add_argument("--patch", type=int, default=None, help="patch of the stem case (CPU 2, CUDA 7)")
    ap.add_argument("--act", default="gelu", help="activation of the block cases: gelu, gelu_tanh, relu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (checks the code path, fast)")
    ap.add_argument("--out", default="bench_out", help="directory for the CSV and plots")
    return ap


def settings(args: argparse.Namespace) -> Settings:
    """The run's settings from the parsed options and the device's defaults; ValueError on a bad option.
    Needs no device: tests resolve the CUDA defaults on a CPU-only machine."""
    dev = args.device
    gpu = dev == "cuda"
    reps = args.reps if args.reps is not None else (20 if gpu else 7)
    model_reps = args.model_reps if args.model_reps is not None else reps
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    dtypes = _csv_list(args.dtypes) or (["bf16"] if gpu else ["fp32"])
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown {d!r} (expected {', '.join(DTYPES)})")
    compile_modes = [] if args.no_compile else (_csv_list(args.compile_modes) or
                                                (["default", "max-autotune"] if gpu else ["default"]))
    fused_layouts = _csv_list(args.fused_layouts)
    for lay in fused_layouts:
        if lay not in ("channels_last", "nchw"):
            raise ValueError(f"--fused-layouts: unknown {lay!r} (expected channels_last, nchw)")
    op_shape = tuple(int(v) for v in args.op_shape.split(",")) if args.op_shape else None
    if op_shape and len(op_shape) != 4:
        raise ValueError("--op-shape takes N,C,H,W")
    if args.act not in ("gelu", "gelu_tanh", "relu"):
        raise ValueError(f"--act: unknown {args.act!r} (expected gelu, gelu_tanh, relu)")
    cases = build_cases(dev, args.tiny, args.gpu_batch, op_shape, args.kernel_size, args.patch, args.act,
                        args.model_batch)
    keys = _csv_list(args.cases) or default_case_keys(dev)
    for k in keys:
        if k not in cases:
            raise ValueError(f"--cases: unknown {k!r} (expected {', '.join(cases)})")
    modes = _csv_list(args.modes)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown {m!r} (expected {', '.join(MODES)})")
    return Settings(dev, keys, modes, dtypes, reps, model_reps, warmup, compile_modes, fused_layouts, cases)


def main(argv=None):
    ap = make_parser()
    args = ap.parse_args(argv)
    try:
        st = settings(args)
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
    os.makedirs(args.out, exist_ok=True)

    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    meta = dict(device=torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})",
                threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                command="python -m convmixer_kernels bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    fused_backends = resolve_backends(args.backends, dev, log)
    log(f"[bench] device={meta['device']} threads={meta['threads']} torch={meta['torch']} reps={st.reps} "
        f"(layer/model {st.model_reps}) warmup={st.warmup} dtypes={','.join(st.dtypes)} "
        f"backends={','.join(fused_backends) or 'none'} compile={','.join(st.compile_modes) or 'off'}")
    ceilings = {}
    for d in st.dtypes:
        ceilings[d] = measure_ceilings(dev, DTYPES[d])
        log(f"[bench] measured ceilings ({d}): GEMM {ceilings[d]['gemm_gflops']:.1f} GFLOP/s, "
            f"copy {ceilings[d]['copy_gbs']:.1f} GB/s")
    results: List[Result] = []
    csv_path = os.path.join(args.out, f"bench_{dev}.csv")
    for key in st.keys:
        case = st.cases[key]
        modes = st.modes or list(CASE_DEFAULT_MODES[case.kind])
        for d in st.dtypes:
            log(f"[bench] === {case.name} [{d}]  (t={time.perf_counter() - t_start:.0f}s)")
            results += bench_case(case, modes, d, dev, st.reps if case.kind == "op" else st.model_reps, st.warmup,
                                  fused_backends, st.compile_modes, st.fused_layouts, args.compile_backend, log)
            write_csv(results, csv_path, meta, ceilings)  # after every case: a cut run keeps what it measured
    print(format_table(results))
    title = f"{meta['device']}, {meta['threads']} threads, torch {meta['torch']}"
    pngs = [p for p in (plot_speedups(results, os.path.join(args.out, f"speedup_{dev}.png"), title),
                        plot_roofline(results, ceilings, os.path.join(args.out, f"roofline_{dev}.png"), title)) if p]
    print(f"\n[bench] wrote {csv_path}" + "".join(f", {p}" for p in pngs)
          + f" in {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0
