"""GPU block benchmarks: the depthwise block, the pointwise (conv-act-BN) block and a full mixer layer at
ConvMixer-1536/20 (batch 64, 1536 ch, 32x32, k=9, GELU) and ConvMixer-768/32 (batch 64, 768 ch, 32x32,
k=7, ReLU) shapes, bf16 and fp16, eval and training (forward + backward), against

    eager_nchw, eager_cl (channels_last), compile (torch.compile default, NCHW),
    compile_max_autotune (mode="max-autotune", NCHW); both compile variants run in a child process
    under --compile-timeout-s (skipped, and said so in the status column, when over the cap/budget),
    fused_<backend> (channels_last) for each built GPU backend: triton, cuda.

Times are medians from triton.testing.do_bench (return_mode="median"; it flushes L2 before every run,
and one activation is 100-200 MB, far over the 50-60 MB L2), taken in --rounds interleaved rounds.
Ceilings are measured once at start: a 2 GiB device-to-device copy (read + write bytes) and an
8192^3 bf16 matmul on random data, plus an fp32 FMA-chain Triton kernel (the CUDA-core rate the
depthwise conv actually runs at). Roofline floor of a row = max(floor bytes / copy GB/s,
FLOPs / matmul TFLOP/s), floor bytes = every input read once + every output written once (training:
forward x in, y out; backward dy and x in, dx and weight grads out); `frac_floor` = floor / measured.
`frac_floor_fma` uses the FMA ceiling for the depthwise FLOPs instead (they cannot use tensor cores).

BatchNorm parameters and running statistics stay fp32 (the AMP convention the fused ops require); the
conv weights and activations are in the benchmark dtype. Training rows backpropagate a fixed random dy
into x and every parameter (grads set to None before each run).

    python benchmarks/bench_gpu.py --out DIR [--budget-s 200] [--tune 2] [--compile-rows targets]
    python benchmarks/bench_gpu.py --dry-run      # CPU, tiny shapes, perf_counter: checks the code path

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

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from convmixer_kernels import backends  # noqa: E402
from convmixer_kernels.convert import convert  # noqa: E402
from convmixer_kernels.reference import Residual, make_act  # noqa: E402

SHAPES = {  # name: (batch, dim, H=W, k, act)
    "1536/20": (64, 1536, 32, 9, "gelu"),
    "768/32": (64, 768, 32, 7, "relu"),
}
TINY = {"1536/20": (2, 16, 8, 9, "gelu"), "768/32": (2, 8, 6, 7, "relu")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCKS = ("dw", "pw", "layer")
MODES = ("eval", "train")
BASE_VARIANTS = ("eager_nchw", "eager_cl", "compile", "compile_max_autotune")
TARGET_ROWS = {("dw", "1536/20", "bf16", "eval"), ("layer", "1536/20", "bf16", "train")}
CSV_FIELDS = ["block", "shape", "dtype", "mode", "variant", "median_ms", "status", "first_call_s",
              "floor_bytes", "flops", "gbps", "tflops", "floor_ms", "frac_floor", "floor_fma_ms", "frac_floor_fma",
              "vs_eager_nchw", "device", "torch", "triton", "tune", "note"]


def log(*a):
    print(*a, flush=True)


# --- models -----------------------------------------------------------------------------------------

def build(block: str, shape: tuple, dtype: torch.dtype, device: str) -> nn.Module:
    _, dim, _, k, act = shape

    def dw():
        return Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"), make_act(act),
                                      nn.BatchNorm2d(dim)))

    def pw():
        return nn.Sequential(nn.Conv2d(dim, dim, 1), make_act(act), nn.BatchNorm2d(dim))

    m = {"dw": dw, "pw": pw, "layer": lambda: nn.Sequential(dw(), *pw())}[block]()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    m = m.to(device=device, dtype=dtype)
    for mod in m.modules():  # BN parameters and statistics stay fp32 (AMP convention)
        if isinstance(mod, nn.BatchNorm2d):
            mod.float()
    return m


def floors(block: str, shape: tuple, dtype: torch.dtype, mode: str):
    """(floor bytes, total FLOPs, depthwise FLOPs) of one call (training: forward + backward)."""
    n, dim, hw, k, _ = shape
    e = torch.finfo(dtype).bits // 8
    act = n * dim * hw * hw
    w = {"dw": dim * k * k + dim, "pw": dim * dim + dim, "layer": dim * k * k + dim * dim + 2 * dim}[block]
    bn = {"dw": 1, "pw": 1, "layer": 2}[block] * dim * 4 * 4  # gamma, beta, running mean, var (fp32)
    dw_fl = 2 * k * k * act if block in ("dw", "layer") else 0
    pw_fl = 2 * act * dim if block in ("pw", "layer") else 0
    if mode == "eval":
        return 2 * act * e + w * e + bn, dw_fl + pw_fl, dw_fl
    # forward: x in, y out, w in; backward: dy, x, w in; dx, dw out (+ BN grads)
    return 5 * act * e + 3 * w * e + 2 * bn, 3 * (dw_fl + pw_fl), 3 * dw_fl


# --- timing -----------------------------------------------------------------------------------------

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, rep_ms, warmup_ms, grads):
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                                             return_mode="median"))
    times = []
    fn()
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        for g in grads or ():
            g.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device, tiny):
    out = {}
    if device != "cuda":
        # placeholders so the dry run exercises the same arithmetic; not measurements
        n = (1 << 20) if tiny else (1 << 26)
        a = torch.randn(n)
        b = torch.empty_like(a)
        out["copy_gbps"] = 2 * a.numel() * 4 / bench(lambda: b.copy_(a), device, 50, 5, None) / 1e6
        m = torch.randn(256, 256)
        out["mm_tflops"] = 2 * 256 ** 3 / bench(lambda: m @ m, device, 50, 5, None) / 1e9
        out["fma_tflops"] = None
        return out
    n = (2 << 30) // 2  # 2 GiB of bf16
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), device, 200, 50, None)
    out["copy_gbps"] = 2 * a.numel() * 2 / ms / 1e6
    del a, b
    s = 8192
    x = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    y = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: x @ y, device, 200, 50, None)
    out["mm_tflops"] = 2 * s ** 3 / ms / 1e9
    del x, y
    try:
        out["fma_tflops"] = _fma_ceiling(device)
    except Exception as e:  # informational
        out["fma_tflops"] = None
        out["fma_error"] = f"{type(e).__name__}: {e}"
    torch.cuda.empty_cache()
    return out


def _fma_ceiling(device, n=1 << 24, iters=512, block=1024):
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
    ms = bench(lambda: fma_kernel[(n // block,)](x, y, ITERS=iters, BLOCK=block, num_warps=8), device, 100, 20, None)
    return 2 * 4 * iters * n / ms / 1e9


# --- variants ---------------------------------------------------------------------------------------

def make_variant(name, base, x, compile_timeout):
    cl = torch.channels_last
    if name == "eager_nchw":
        return copy.deepcopy(base), x.clone()
    if name == "eager_cl":
        return copy.deepcopy(base).to(memory_format=cl), x.contiguous(memory_format=cl)
    if name == "compile":
        return torch.compile(copy.deepcopy(base)), x.clone()
    if name == "compile_max_autotune":
        return torch.compile(copy.deepcopy(base), mode="max-autotune"), x.clone()
    if name.startswith("fused_"):
        m = convert(copy.deepcopy(base), backend=name[len("fused_"):])
        return m.to(memory_format=cl), x.contiguous(memory_format=cl)
    raise ValueError(name)


def step_fn(model, x, dy, mode):
    if mode == "eval":
        model.eval()

        def run():
            with torch.no_grad():
                model(x)
        return run, None
    model.train()
    x.requires_grad_(True)
    grads = [x] + [p for p in model.parameters()]

    def run():
        model(x).backward(dy)
    return run, grads


def tune_autotuners(keep):
    """Keep the first `keep` autotune configs of every Triton kernel of the package (compile-time budget:
    autotuning compiles every config once per new key, and k=9 kernels take seconds each)."""
    if keep is None:
        return []
    try:
        from triton.runtime.autotuner import Autotuner
        from convmixer_kernels.triton import conv_act_bn, dw_block
    except Exception:
        return []
    changed = []
    for mod in (dw_block, conv_act_bn):
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner) and len(obj.configs) > keep:
                obj.configs = obj.configs[:keep]
                changed.append(name)
    return changed


def run_row(block, shape_name, dtype_name, mode, variants, args, ceil, meta, extra_note=None):
    """Measures every variant of one (block, shape, dtype, mode); returns CSV rows."""
    shape = (TINY if args.tiny else SHAPES)[shape_name]
    dtype = DTYPES[dtype_name]
    dev = args.device
    torch.manual_seed(0)
    base = build(block, shape, dtype, dev)
    n, dim, hw, _, _ = shape
    x = torch.randn(n, dim, hw, hw, device=dev, dtype=dtype)
    fbytes, flops, dw_flops = floors(block, shape, dtype, mode)
    ready, rows = {}, {}
    for v in variants:
        row = dict(block=block, shape=shape_name, dtype=dtype_name, mode=mode, variant=v, status="ok",
                   floor_bytes=fbytes, flops=flops, **meta)
        rows[v] = row
        if args.deadline and time.time() > args.deadline:
            row["status"] = "skipped: budget"
            continue
        try:
            m, xv = make_variant(v, base, x, args.compile_timeout_s)
            dy = torch.randn_like(xv) if mode == "train" else None
            fn, grads = step_fn(m, xv, dy, mode)
            t0 = time.perf_counter()
            fn()  # first call: compile / autotune
            sync(dev)
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            ready[v] = (fn, grads, m, xv)
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if args.verbose:
                traceback.print_exc()
    times = {v: [] for v in ready}
    for r in range(args.rounds):  # interleaved rounds
        for v, (fn, grads, _, _) in ready.items():
            if args.deadline and time.time() > args.deadline and times[v]:
                continue
            try:
                times[v].append(bench(fn, dev, args.rep_ms / args.rounds, args.warmup_ms, grads))
            except Exception as e:
                rows[v]["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    for v in list(ready):
        if times[v] and rows[v]["status"] == "ok":
            rows[v]["median_ms"] = statistics.median(times[v])
    del ready
    if dev == "cuda":
        torch.cuda.empty_cache()
    out = []
    base_ms = rows.get("eager_nchw", {}).get("median_ms")
    for v, row in rows.items():
        ms = row.get("median_ms")
        if ms:
            row["gbps"] = fbytes / ms / 1e6
            row["tflops"] = flops / ms / 1e9
            floor_ms = max(fbytes / (ceil["copy_gbps"] * 1e6), flops / (ceil["mm_tflops"] * 1e9))
            row["floor_ms"] = floor_ms
            row["frac_floor"] = floor_ms / ms
            if ceil.get("fma_tflops"):
                f2 = max(fbytes / (ceil["copy_gbps"] * 1e6),
                         dw_flops / (ceil["fma_tflops"] * 1e9) + (flops - dw_flops) / (ceil["mm_tflops"] * 1e9))
                row["floor_fma_ms"] = f2
                row["frac_floor_fma"] = f2 / ms
            if base_ms:
                row["vs_eager_nchw"] = base_ms / ms
        if extra_note:
            row["note"] = extra_note
        out.append(row)
    return out


def run_single_subprocess(args, block, shape_name, dtype_name, mode, variant, ceil):
    """One variant in a child process under a wall-clock cap (torch.compile max-autotune can take minutes)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--single", json.dumps([block, shape_name, dtype_name, mode,
                                                                              variant]),
           "--ceilings", json.dumps(ceil), "--device", args.device, "--rep-ms", str(args.rep_ms),
           "--warmup-ms", str(args.warmup_ms), "--rounds", "1"] + (["--tiny"] if args.tiny else [])
    cap = args.compile_timeout_s
    if args.deadline:
        cap = min(cap, max(0, args.deadline - time.time()))
    if cap < 20:
        return None, "skipped: budget"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        return None, f"skipped: over the {cap:.0f}s cap"
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("SINGLE_JSON "):
            return json.loads(line[len("SINGLE_JSON "):]), None
    return None, f"error: child rc={p.returncode}: {(p.stderr or '').strip().splitlines()[-1:] or ''}"


# --- report -----------------------------------------------------------------------------------------

def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and v == v else "-"


def print_table(rows):
    log(f"\n{'block':<6}{'shape':<9}{'dt':<5}{'mode':<6}{'variant':<22}{'ms':>9}{'GB/s':>8}{'TFLOP/s':>9}"
        f"{'floor%':>8}{'fma%':>7}{'vsNCHW':>8}  status")
    for r in rows:
        log(f"{r['block']:<6}{r['shape']:<9}{r['dtype']:<5}{r['mode']:<6}{r['variant']:<22}"
            f"{fmt(r.get('median_ms'), '9.3f')}{fmt(r.get('gbps'), '8.0f')}{fmt(r.get('tflops'), '9.1f')}"
            f"{fmt(100 * r['frac_floor'] if r.get('frac_floor') else None, '7.1f')}%"
            f"{fmt(100 * r['frac_floor_fma'] if r.get('frac_floor_fma') else None, '6.1f')}%"
            f"{fmt(r.get('vs_eager_nchw'), '7.2f')}x  {r['status'] if r['status'] != 'ok' else ''}")


def get(rows, block, shape, dtype, mode, variant):
    for r in rows:
        if (r["block"], r["shape"], r["dtype"], r["mode"], r["variant"]) == (block, shape, dtype, mode, variant):
            return r.get("median_ms"), r
    return None, None


def target_ratios(rows, fused):
    out = {}
    for f in fused:
        ms, r = get(rows, "dw", "1536/20", "bf16", "eval", f)
        if ms:
            e, _ = get(rows, "dw", "1536/20", "bf16", "eval", "eager_nchw")
            ma, _ = get(rows, "dw", "1536/20", "bf16", "eval", "compile_max_autotune")
            cd, _ = get(rows, "dw", "1536/20", "bf16", "eval", "compile")
            out[f"dw_eval_bf16_1536/{f}"] = dict(
                ms=ms, frac_floor=r.get("frac_floor"), frac_floor_fma=r.get("frac_floor_fma"),
                vs_eager_nchw=e / ms if e else None, vs_compile_max_autotune=ma / ms if ma else None,
                vs_compile_default=cd / ms if cd else None)
        ms, r = get(rows, "layer", "1536/20", "bf16", "train", f)
        if ms:
            e, _ = get(rows, "layer", "1536/20", "bf16", "train", "eager_nchw")
            c, _ = get(rows, "layer", "1536/20", "bf16", "train", "eager_cl")
            out[f"layer_train_bf16_1536/{f}"] = dict(ms=ms, frac_floor=r.get("frac_floor"),
                                                     vs_eager_nchw=e / ms if e else None,
                                                     vs_eager_cl=c / ms if c else None)
    return out


def winners(rows, fused):
    """Per op, triton vs cuda: geometric mean of t_triton / t_cuda over the rows both measured
    (dw_block: the dw rows; conv_act_bn: the pw rows)."""
    out = {}
    if not {"fused_triton", "fused_cuda"} <= set(fused):
        only = [f[len("fused_"):] for f in fused]
        return {op: dict(winner=only[0] if len(only) == 1 else None, reason="only one GPU backend measured" if only
                         else "no GPU backend measured") for op in ("dw_block", "conv_act_bn")}
    for op, block in (("dw_block", "dw"), ("conv_act_bn", "pw")):
        ratios = []
        for r in rows:
            if r["block"] == block and r["variant"] == "fused_triton" and r.get("median_ms"):
                c, _ = get(rows, block, r["shape"], r["dtype"], r["mode"], "fused_cuda")
                if c:
                    ratios.append(r["median_ms"] / c)
        if ratios:
            g = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            out[op] = dict(winner="cuda" if g > 1 else "triton", geomean_t_triton_over_t_cuda=g, rows=len(ratios))
        else:
            out[op] = dict(winner=None, reason="no row measured both")
    return out


# --- main -------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (implied on the CPU)")
    ap.add_argument("--dry-run", action="store_true", help="--device cpu --tiny, no compile variants")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument("--blocks", default=",".join(BLOCKS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--variants", default=None, help="comma list (default: every base variant + fused_<backend>)")
    ap.add_argument("--compile-rows", default="targets", choices=("targets", "all", "none"),
                    help="rows that get the torch.compile variants (targets: the two target rows)")
    ap.add_argument("--compile-timeout-s", type=float, default=150, help="cap for the max-autotune subprocess")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting new measurements after this (0: none)")
    ap.add_argument("--tune", default="all", help="'all', or keep the first N autotune configs of each kernel")
    ap.add_argument("--rep-ms", type=float, default=100)
    ap.add_argument("--warmup-ms", type=float, default=25)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--subprocess-variants", default="compile,compile_max_autotune",
                    help="variants measured in a child process under --compile-timeout-s (a wall-clock cap on "
                         "torch.compile; the child times them alone, not interleaved)")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ceilings", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    if args.device == "cpu":
        args.tiny = True
    if args.device == "cuda" and not torch.cuda.is_available():
        log("bench_gpu: --device cuda but torch.cuda.is_available() is False")
        return 2
    t_start = time.time()
    args.deadline = t_start + args.budget_s if args.budget_s else None
    tuned = tune_autotuners(None if args.tune == "all" else int(args.tune))
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()})",
                torch=torch.__version__, triton=triton_version, tune=args.tune)

    if args.single:  # child process: one variant of one row
        block, shape_name, dtype_name, mode, variant = json.loads(args.single)
        ceil = json.loads(args.ceilings)
        rows = run_row(block, shape_name, dtype_name, mode, [variant], args, ceil, meta)
        print("SINGLE_JSON " + json.dumps(rows[0]), flush=True)
        return 0

    os.makedirs(args.out, exist_ok=True)
    log(f"[bench_gpu] device={meta['device']} torch={meta['torch']} triton={triton_version} tiny={args.tiny} "
        f"tune={args.tune}{' (' + str(len(tuned)) + ' autotuners trimmed)' if tuned else ''}")
    ceil = measure_ceilings(args.device, args.tiny)
    log(f"[bench_gpu] ceilings: copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul {ceil['mm_tflops']:.1f} TFLOP/s, "
        f"fp32 FMA {fmt(ceil.get('fma_tflops'), '.1f')} TFLOP/s" + (" (CPU placeholders)" if args.device == "cpu" else ""))

    avail = backends.available_backends()
    gpu_names = ("triton", "cuda") if args.device == "cuda" else ("cpu",)
    fused = [f"fused_{b}" for b in gpu_names if avail.get(b, (False,))[0]]
    for b in gpu_names:
        if not avail.get(b, (False,))[0]:
            log(f"[bench_gpu] backend {b} unavailable: {avail.get(b, (False, 'unknown'))[1]}")
    variants = args.variants.split(",") if args.variants else list(BASE_VARIANTS) + fused
    if args.device == "cpu":  # dry run: no torch.compile (minutes of C++ compile on 2 cores)
        variants = [v for v in variants if not v.startswith("compile")]
    fused = [v for v in variants if v.startswith("fused_")]

    csv_path = os.path.join(args.out, "bench_gpu.csv")
    all_rows = []

    def flush():
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in all_rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    # the target rows first, so a budget cut keeps them
    combos = [(b, s, d, m) for d in args.dtypes.split(",") for s in args.shapes.split(",")
              for m in args.modes.split(",") for b in args.blocks.split(",")]
    combos.sort(key=lambda c: c not in TARGET_ROWS)
    for block, shape_name, dtype_name, mode in combos:
        want_compile = args.compile_rows == "all" or (args.compile_rows == "targets" and
                                                      (block, shape_name, dtype_name, mode) in TARGET_ROWS)
        vs = [v for v in variants if want_compile or not v.startswith("compile")]
        sub = [v for v in vs if v in args.subprocess_variants.split(",")]
        t0 = time.time()
        rows = run_row(block, shape_name, dtype_name, mode, [v for v in vs if v not in sub], args, ceil, meta)
        for v in sub:
            r, why = run_single_subprocess(args, block, shape_name, dtype_name, mode, v, ceil)
            if r is None:
                r = dict(block=block, shape=shape_name, dtype=dtype_name, mode=mode, variant=v, status=why, **meta)
            base_ms = next((x.get("median_ms") for x in rows if x["variant"] == "eager_nchw"), None)
            if r.get("median_ms") and base_ms:
                r["vs_eager_nchw"] = base_ms / r["median_ms"]
            rows.append(r)
        all_rows += rows
        flush()
        log(f"[bench_gpu] {block} {shape_name} {dtype_name} {mode}: " + "  ".join(
            f"{r['variant']}={fmt(r.get('median_ms'), '.3f')}" + ("" if r["status"] == "ok" else f"({r['status'][:40]})")
            for r in rows) + f"  [{time.time() - t0:.0f}s]")

    print_table(all_rows)
    ratios = target_ratios(all_rows, fused)
    win = winners(all_rows, fused)
    log("\n[bench_gpu] target ratios:")
    for k, v in ratios.items():
        log(f"  {k}: " + ", ".join(f"{a}={fmt(b, '.3f')}" for a, b in v.items()))
    log("[bench_gpu] measured winners (for backends.CUDA_WINNERS): "
        + json.dumps({op: w.get("winner") for op, w in win.items()}) + f"  detail: {json.dumps(win)}")
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump(dict(meta=meta, ceilings=ceil, tiny=args.tiny, targets=ratios, winners=win, tuned=tuned,
                       seconds=round(time.time() - t_start, 1), command=" ".join(sys.argv)), f, indent=1)
    log(f"[bench_gpu] wrote {csv_path} and bench_gpu.json in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
