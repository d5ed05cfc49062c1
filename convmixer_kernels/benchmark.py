"""Block and model benchmarks: eager NCHW, eager channels_last, torch.compile and the fused path,
timed in one process and interleaved (each repetition runs every variant once, in turn), reported as
medians and ratios, with the bytes each variant saves for the backward.

    python -m convmixer_kernels bench [--cases dw,layer,model] [--modes eval,train] [--reps N] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .convert import convert
from .reference import ConvMixerPaper, Residual, make_act


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]  # eager (unfused) model
    input_shape: tuple
    target: Optional[torch.Tensor] = None


@dataclass
class Result:
    case: str
    mode: str
    variant: str
    median_ms: float
    times_ms: List[float] = field(default_factory=list)
    saved_bytes: Optional[int] = None


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def default_cases(device: str) -> Dict[str, Case]:
    """The shapes of issue #2: the depthwise block at batch 32, 256 channels, 16x16, k=9; one mixer
    layer at that shape; ConvMixer-256/8 (k=9, p=2) on 32 px CIFAR-size images, batch 64."""
    dim, k = 256, 9

    def dw():
        return Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"), make_act("gelu"),
                                      nn.BatchNorm2d(dim)))

    def layer():
        return nn.Sequential(dw(), nn.Conv2d(dim, dim, 1), make_act("gelu"), nn.BatchNorm2d(dim))

    def model():
        return ConvMixerPaper(dim, 8, kernel_size=k, patch_size=2, n_classes=10)

    return {
        "dw": Case("dw_block 32x256x16x16 k9", dw, (32, dim, 16, 16)),
        "layer": Case("mixer_layer 32x256x16x16 k9", layer, (32, dim, 16, 16)),
        "model": Case("convmixer_256_8 b64 32px k9 p2", model, (64, 3, 32, 32)),
    }


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


def _variants(case: Case, mode: str, device: str, with_compile: bool):
    torch.manual_seed(0)
    eager = _randomize_bn(case.build()).to(device)
    eager.train(mode == "train")
    x = torch.randn(case.input_shape, device=device)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    eager_cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    fused = convert(eager)
    fused_cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    out = [("eager_nchw", eager, x), ("eager_channels_last", eager_cl, cl(x))]
    if with_compile:
        out.append(("torch_compile", torch.compile(copy.deepcopy(eager)), x))
    out += [("fused_nchw", fused, x), ("fused_channels_last", fused_cl, cl(x))]
    return out


def _step_fn(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "eval":
        def run():
            with torch.no_grad():
                model(x)
    else:
        params = [p for p in model.parameters()]

        def run():
            for p in params:
                p.grad = None
            model(x).float().square().mean().backward()
    return run


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench_case(case: Case, mode: str, device: str, reps: int, warmup: int, with_compile: bool,
               log=print) -> List[Result]:
    variants = _variants(case, mode, device, with_compile)
    fns = {}
    results = {}
    for name, model, x in variants:
        fn = _step_fn(model, x, mode)
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        _sync(device)
        note = f" (warm-up incl. compile {time.perf_counter() - t0:.1f}s)" if name == "torch_compile" else ""
        saved = None
        if mode == "train" and name != "torch_compile":
            saved = saved_activation_bytes(model, x)
        fns[name] = fn
        results[name] = Result(case.name, mode, name, 0.0, [], saved)
        log(f"    ready {name}{note}")
    for r in range(reps):
        for name, fn in fns.items():  # interleaved: every variant once per repetition
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            results[name].times_ms.append((time.perf_counter() - t0) * 1e3)
        log(f"    rep {r + 1}/{reps}: " + "  ".join(f"{n}={results[n].times_ms[-1]:.1f}ms" for n in fns))
    for res in results.values():
        res.median_ms = statistics.median(res.times_ms)
    return list(results.values())


def measure_ceilings(device: str) -> dict:
    """The two ceilings the floors are counted against, measured here: fp32 GEMM rate (a 16384 x 256 x
    256 product, the pointwise conv's shape) and copy bandwidth (bytes read + written)."""
    a = torch.randn(16384, 256, device=device)
    b = torch.randn(256, 256, device=device)
    big = torch.randn(32 * 2**20 // 4, device=device)  # 32 MiB, past the L2 of one core pair
    def med(fn, n=15):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    t_mm = med(lambda: torch.mm(a, b))
    t_cp = med(lambda: big.clone())
    return {"gemm_gflops": 2 * 16384 * 256 * 256 / t_mm / 1e9, "copy_gbs": 2 * big.numel() * 4 / t_cp / 1e9}


def format_table(results: List[Result]) -> str:
    lines = []
    by_case: Dict[tuple, List[Result]] = {}
    for r in results:
        by_case.setdefault((r.case, r.mode), []).append(r)
    for (case, mode), rs in by_case.items():
        base = next(r for r in rs if r.variant == "eager_nchw")
        lines.append(f"\n{case} [{mode}]")
        lines.append(f"  {'variant':<22}{'median ms':>11}{'vs eager':>10}{'saved MB':>10}{'saved %':>9}")
        for r in rs:
            saved = f"{r.saved_bytes / 2**20:10.1f}" if r.saved_bytes is not None else f"{'-':>10}"
            pct = (f"{100 * r.saved_bytes / base.saved_bytes:8.0f}%"
                   if r.saved_bytes is not None and base.saved_bytes else f"{'-':>9}")
            lines.append(f"  {r.variant:<22}{r.median_ms:11.2f}{base.median_ms / r.median_ms:9.2f}x{saved}{pct}")
        others = [r for r in rs if r.variant in ("eager_channels_last", "torch_compile")]
        for f in (r for r in rs if r.variant.startswith("fused")):
            if others:
                best = min(others, key=lambda r: r.median_ms)
                lines.append(f"  {f.variant} vs best of channels_last/compile ({best.variant}): "
                             f"{best.median_ms / f.median_ms:.2f}x")
    return "\n".join(lines)


def write_csv(results: List[Result], path: str, meta: dict):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "mode", "variant", "median_ms", "speedup_vs_eager_nchw", "saved_bytes", "reps",
                    "device", "threads", "torch", "date", "command", "gemm_gflops", "copy_gbs"])
        base = {(r.case, r.mode): r.median_ms for r in results if r.variant == "eager_nchw"}
        for r in results:
            w.writerow([r.case, r.mode, r.variant, f"{r.median_ms:.4f}", f"{base[(r.case, r.mode)] / r.median_ms:.4f}",
                        r.saved_bytes if r.saved_bytes is not None else "", len(r.times_ms), meta["device"],
                        meta["threads"], meta["torch"], meta["date"], meta["command"], meta["gemm_gflops"],
                        meta["copy_gbs"]])


def plot_speedups(results: List[Result], path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        groups.setdefault((r.case, r.mode), []).append(r)
    variants = list(dict.fromkeys(r.variant for r in results))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, (key, rs) in enumerate(groups.items()):
            base = next(r for r in rs if r.variant == "eager_nchw").median_ms
            r = next((r for r in rs if r.variant == v), None)
            if r:
                xs.append(j + i * width)
                ys.append(base / r.median_ms)
        ax.bar(xs, ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c.split(' ')[0]}\n{m}" for c, m in groups], fontsize=8)
    ax.set_ylabel("speed-up vs eager NCHW (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m convmixer_kernels bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="dw,layer,model", help="comma list of: dw, layer, model")
    ap.add_argument("--modes", default="eval,train", help="comma list of: eval, train")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (interleaved)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_out", help="directory for the CSV and plots")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cases = default_cases(args.device)
    meta = dict(device=args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
                threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                command="python -m convmixer_kernels bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"[bench] device={args.device} threads={meta['threads']} torch={meta['torch']} reps={args.reps}", flush=True)
    ceil = measure_ceilings(args.device)
    meta.update({k: f"{v:.1f}" for k, v in ceil.items()})
    print(f"[bench] measured ceilings: fp32 GEMM {ceil['gemm_gflops']:.1f} GFLOP/s, copy {ceil['copy_gbs']:.1f} GB/s",
          flush=True)
    results = []
    for key in args.cases.split(","):
        for mode in args.modes.split(","):
            print(f"[bench] {cases[key].name} [{mode}]", flush=True)
            results += bench_case(cases[key], mode, args.device, args.reps, args.warmup, not args.no_compile,
                                  log=lambda s: print(s, flush=True))
    table = format_table(results)
    print(table)
    csv_path = os.path.join(args.out, f"bench_{args.device}.csv")
    write_csv(results, csv_path, meta)
    png = plot_speedups(results, os.path.join(args.out, f"speedup_{args.device}.png"))
    print(f"\n[bench] wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0
