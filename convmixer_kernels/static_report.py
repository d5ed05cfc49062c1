"""`python -m convmixer_kernels inspect`: a static report of the GPU kernels, read off their compiled code.

No GPU is needed. The CUDA sources (csrc/cuda/*.cu, light headers only) are compiled to cubins with nvcc
for sm_90 and sm_80; the Triton kernels go through Triton's own compiler ahead of time
(convmixer_kernels/triton/aot.py). From each cubin, with the cuobjdump/nvdisasm in Triton's wheel
(convmixer_kernels/sass.py): registers, stack/local bytes (spills), static shared memory; from the
launcher's geometry at the layer shape: block size, dynamic shared memory, occupancy, global bytes per
output; from the SASS of the hot loop: the instruction mix per output element. And a static lower
bound of the kernel's time at the layer shape:

    max(HBM bytes / HBM_BW,  FMA work / FMA_PEAK,  issued instructions / ISSUE_RATE)

These are estimates from the code, not measurements: the hot loop's static instruction count stands
for the executed count (the loop body runs once per iteration; code outside the loop is not counted,
so the bound is optimistic), and the HBM bytes assume every staged tile stays on chip.

    python -m convmixer_kernels inspect [--out DIR] [--arch 90,80] [--no-triton] [--shapes 1536,768]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

from . import sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

# --- H200 (SXM) constants, defined once -------------------------------------------------------------
# 132 SMs and 60 MB L2: read by PyTorch on the lent H200 (.library/device/KINDS.md, 2026-10-28). Clock:
# 1980 MHz SM clock read by nvidia-smi under load (same record). 4 warp schedulers per SM, each issuing
# one warp instruction per clock, and 128 fp32 lanes per SM: NVIDIA's Hopper architecture whitepaper
# (GH100 SM). HBM: the ~4.3 TB/s device-to-device copy measured there (read + write bytes), below the
# datasheet's 4.8 TB/s (.library/device/H200.md).
H200 = dict(sms=132, schedulers_per_sm=4, clock_hz=1.98e9, fp32_lanes_per_sm=128, hbm_bytes_per_s=4.3e12,
            regs_per_sm=65536, max_threads_per_sm=2048, max_blocks_per_sm=32, smem_per_sm=228 * 1024,
            smem_reserved_per_block=1024)
SM80 = dict(regs_per_sm=65536, max_threads_per_sm=2048, max_blocks_per_sm=32, smem_per_sm=164 * 1024,
            smem_reserved_per_block=1024)
FMA_PEAK = H200["sms"] * H200["fp32_lanes_per_sm"] * H200["clock_hz"]               # fp32 FMA/s (33.4e12)
ISSUE_RATE = H200["sms"] * H200["schedulers_per_sm"] * 32 * H200["clock_hz"]          # thread-instructions/s
HBM_BW = H200["hbm_bytes_per_s"]

# The layer shapes of the report (ConvMixer-1536/20 and -768/32 at batch 64, 224 px images, patch 7).
SHAPES = {
    "1536/20": dict(N=64, C=1536, H=32, W=32, k=9, act="gelu"),
    "768/32": dict(N=64, C=768, H=32, W=32, k=7, act="relu"),
}
ACT_CODE = {"gelu": 0, "gelu_tanh": 1, "relu": 2}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CXX_DTYPE = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}

# Mirrors of the CUDA launchers' geometry (csrc/cuda/launch_common.h launch_shape, dw_block.cu
# plan_conv_tiling / conv_tile_smem_bytes / plan_tiles): change them together.
TILE_C, TILE_PIX, ROW_OUT, TILE_THREADS, MAX_TILED_K = 8, 9, 8, 256, 9
MODES = {"kApply": 0, "kStats": 1, "kReduce": 2}


def conv_tiling(H, W, conv_tile_h=32, conv_tile_w=32):
    tw = min(math.ceil(W / ROW_OUT) * ROW_OUT, conv_tile_w)
    th = min(H, conv_tile_h)
    return th, tw, math.ceil(H / th), math.ceil(W / tw)


def conv_tile_smem(k, th, tw):
    return ((th + k - 1) * (tw + k - 1) * TILE_PIX + th * tw * TILE_C + 2 * TILE_C) * 4


def staged_read_factor(H, W, k, th, tw, tiles_h, tiles_w):
    """Global reads of x per output element: in-image pixels of every tile's halo window / H*W."""
    pl, pr = (k - 1) // 2, k - 1 - (k - 1) // 2
    total = 0
    for a in range(tiles_h):
        r0, r1 = max(0, a * th - pl), min(H, a * th + th + pr)
        for b in range(tiles_w):
            c0, c1 = max(0, b * tw - pl), min(W, b * tw + tw + pr)
            total += max(0, r1 - r0) * max(0, c1 - c0)
    return total / (H * W)


def occupancy(regs, threads, smem_bytes, target=90):
    lim = H200 if target == 90 else SM80
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = lim["regs_per_sm"] // (warps * regs_per_warp)
    by_threads = lim["max_threads_per_sm"] // threads
    by_smem = lim["smem_per_sm"] // (smem_bytes + lim["smem_reserved_per_block"]) if smem_bytes else 10 ** 9
    blocks = min(by_regs, by_threads, by_smem, lim["max_blocks_per_sm"])
    return blocks, blocks * threads / lim["max_threads_per_sm"]


# --- compiling the CUDA sources ------------------------------------------------------------------------

def _sources_digest() -> str:
    h = hashlib.sha256()
    for d in (CUDA_DIR, os.path.join(ROOT, "csrc", "common")):
        for f in sorted(os.listdir(d)):
            with open(os.path.join(d, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()[:16]


def build_object(source: str):
    """The extension build's own object of csrc/cuda/<name>.cu (build/temp*/csrc/cuda/<name>.o: a host
    object holding the sm_80/sm_90 cubins that ship), when it is newer than every CUDA and common source;
    else None. Reading it inspects exactly the code the package runs, and costs no compile."""
    import glob
    name = os.path.splitext(os.path.basename(source))[0]
    objs = glob.glob(os.path.join(ROOT, "build", "temp*", "csrc", "cuda", name + ".o"))
    if not objs:
        return None
    obj = max(objs, key=os.path.getmtime)
    newest = max(os.path.getmtime(os.path.join(d, f)) for d in (CUDA_DIR, os.path.join(ROOT, "csrc", "common"))
                 for f in os.listdir(d))
    return obj if os.path.getmtime(obj) >= newest else None


def compile_cuda(source: str, arch: int, out_dir: str, log=print, use_build=True) -> str:
    """A file holding the sm_<arch> code of one csrc/cuda/*.cu: the build's object when fresh
    (build_object), else nvcc -cubin with the build's flags, cached by source digest."""
    obj = build_object(source) if use_build else None
    if obj is not None:
        return obj
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: the CUDA part of the report needs CUDA's compiler")
    name = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(out_dir, f"{name}_sm{arch}_{_sources_digest()}.cubin")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    log(f"  nvcc {os.path.basename(source)} -> sm_{arch} ...", flush=True)
    cmd = [nvcc, "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-lineinfo", "-cubin", f"-arch=sm_{arch}",
           "-o", path + ".tmp", source]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    os.replace(path + ".tmp", path)
    return path


@dataclasses.dataclass
class Row:
    backend: str
    kernel: str
    pass_: str
    shape: str
    dtype: str
    layout: str
    target: int
    config: str
    threads: int
    regs: int
    stack: int
    local: int
    shared_static: int
    shared_dynamic: int
    blocks_per_sm: int
    occupancy: float
    loop_instr: int
    outputs_per_loop: float
    instr_per_output: float
    ffma_per_output: float
    ffma_fraction: float
    ldg_per_output: float
    lds_per_output: float
    stg_per_output: float
    int_per_output: float
    cvt_per_output: float
    global_bytes_per_output: float
    hbm_us: float
    fma_us: float
    issue_us: float
    bound_us: float
    floor_us: float
    bound_over_floor: float
    note: str = ""


def _row(backend, kernel, pass_, shape_name, dtype, layout, target, config, threads, res, mix, outputs_per_loop,
         smem_dyn, bytes_per_output, fma_per_output, note="", floor_bytes_per_output=None) -> Row:
    """bytes_per_output: the global bytes the kernel moves per output (its tiles' halos included);
    floor_bytes_per_output: the pass's unique bytes (each tensor once), for the physical floor."""
    s = SHAPES[shape_name]
    outputs = s["N"] * s["C"] * s["H"] * s["W"]
    blocks, occ = occupancy(res.regs, threads, smem_dyn + res.shared, target)
    per = lambda cls: (mix.classes.get(cls, 0) / outputs_per_loop) if outputs_per_loop else float("nan")
    instr_po = mix.instructions / outputs_per_loop if outputs_per_loop else float("nan")
    hbm_us = outputs * bytes_per_output / HBM_BW * 1e6
    fma_us = outputs * fma_per_output / FMA_PEAK * 1e6
    issue_us = outputs * instr_po / ISSUE_RATE * 1e6 if outputs_per_loop else float("nan")
    bound = max(hbm_us, fma_us, issue_us if issue_us == issue_us else 0.0)
    fb = bytes_per_output if floor_bytes_per_output is None else floor_bytes_per_output
    floor = max(outputs * fb / HBM_BW * 1e6, fma_us)
    return Row(backend, kernel, pass_, shape_name, dtype, layout, target, config, threads, res.regs, res.stack,
               res.local, res.shared, smem_dyn, blocks, round(occ, 3), mix.instructions, outputs_per_loop,
               round(instr_po, 2), round(mix.fma_work / outputs_per_loop, 2) if outputs_per_loop else float("nan"),
               round(mix.fma_fraction, 3), round(per("ldg"), 3), round(per("lds"), 3), round(per("stg"), 3),
               round(per("int"), 2), round(per("cvt"), 2), round(bytes_per_output, 3), round(hbm_us, 1),
               round(fma_us, 1), round(issue_us, 1), round(bound, 1), round(floor, 1),
               round(bound / floor, 2) if floor else float("nan"), note)


def cuda_code(source: str, archs, cache_dir: str, log=print):
    """(arch, "sm_<arch>", resources, SASS) per target of one csrc/cuda/*.cu, demangled; the build's
    object holds every target, so each file is parsed once."""
    parsed = {}
    for arch in archs:
        path = compile_cuda(os.path.join(CUDA_DIR, source), arch, cache_dir, log)
        tag = f"sm_{arch}"
        if path not in parsed:
            parsed[path] = (sass.resource_usage(path, tag), sass.disassemble(path, tag))
            sass.demangle_all(k[1] for k in parsed[path][1])
        yield (arch, tag, path) + parsed[path]


def cuda_rows(shapes, dtypes, layouts, archs, cache_dir, log=print) -> list:
    rows = []
    for arch, tag, path, res, code in cuda_code("dw_block.cu", archs, cache_dir, log):
        names = {k: sass.demangle_cached(k[1]) for k in code}

        def lookup(pattern):
            hits = [k for k, n in names.items() if k[0] == tag and re.search(pattern, n)]
            if len(hits) != 1:
                raise LookupError(f"{pattern}: {len(hits)} functions match in {os.path.basename(path)}")
            return hits[0]

        for shape_name in shapes:
            s = SHAPES[shape_name]
            k, act = s["k"], ACT_CODE[s["act"]]
            th, tw, tiles_h, tiles_w = conv_tiling(s["H"], s["W"])
            smem = conv_tile_smem(k, th, tw)
            rf = staged_read_factor(s["H"], s["W"], k, th, tw, tiles_h, tiles_w)
            for dtype in dtypes:
                e = DTYPE_BYTES[dtype]
                for layout in layouts:
                    # (mode, pass, bytes moved per output, unique bytes per output: x [+ y or dy])
                    for mode, pass_, bytes_po, floor_po in (
                            ("kApply", "eval forward / training apply", rf * e + e, 2 * e),
                            ("kStats", "training statistics", rf * e, e),
                            ("kReduce", "backward reduce (pass 1)", rf * e + e, 2 * e)):
                        key = lookup(rf"dw_conv_tile_kernel<{re.escape(CXX_DTYPE[dtype])}, {k}, {MODES[mode]}>")
                        mix = sass.loop_with_fma(code[key], k * k * ROW_OUT) or sass.hot_loop_mix(code[key])
                        rows.append(_row("cuda", f"dw_conv_tile_kernel<{mode}>", pass_, shape_name, dtype, layout,
                                         arch, f"tile {th}x{tw}x{TILE_C}", TILE_THREADS, res[key], mix, ROW_OUT,
                                         smem, bytes_po, k * k, floor_bytes_per_output=floor_po))
                    # backward pass 2: t recomputed on the dt region, du on the tile (two conv loops of 8k^2
                    # FFMA per row segment), dw (a loop of 8k FFMA per row segment and tap row)
                    key = lookup(rf"dw_backward_tile_kernel<{re.escape(CXX_DTYPE[dtype])}, {k}>")
                    bth, btw, bh, bw = conv_tiling(s["H"], s["W"], 16, 16)
                    dh, dw_ = bth + k - 1, btw + k - 1
                    dwr = math.ceil(dw_ / ROW_OUT) * ROW_OUT
                    inner = sass.innermost_fma_loops(code[key])
                    conv = [m for m in inner if m.fma_work == k * k * ROW_OUT]
                    grad = [m for m in inner if m.fma_work == k * ROW_OUT]
                    note = ""
                    if len(conv) == 2 and len(grad) == 1:
                        # trips per channel lane, per kRowOut outputs of the tile: mix = instructions per kRowOut outputs
                        tile_out = bth * btw
                        mix = sass.weighted_mix([(conv[0], dh * dwr / tile_out), (conv[1], 1.0),
                                                 (grad[0], float(k))])
                        note = (f"3 loops weighted by trips: t on {dh}x{dwr} (recompute x{dh * dwr / tile_out:.2f}), "
                                f"du on {bth}x{btw}, dw k rows")
                    else:
                        mix = sass.hot_loop_mix(code[key])
                        note = f"loops not recognised ({len(conv)} conv, {len(grad)} dw): hot loop only"
                    ssm = (((dh + k - 1) * (dwr + k - 1) + dh * dwr) * TILE_PIX + dh * dw_ * TILE_C
                           + max(1, TILE_THREADS // (TILE_C * k)) * TILE_C * (k * k + 1)) * 4
                    brf = staged_read_factor(s["H"], s["W"], 2 * k - 1, bth, btw, bh, bw)
                    brf_dy = staged_read_factor(s["H"], s["W"], k, bth, btw, bh, bw)
                    rows.append(_row("cuda", "dw_backward_tile_kernel", "backward dt/dx/dw (pass 2)", shape_name,
                                     dtype, layout, arch, f"tile {bth}x{btw}x{TILE_C}", TILE_THREADS, res[key], mix,
                                     ROW_OUT, ssm, (brf + brf_dy + 1) * e, 3 * k * k, note=note,
                                     floor_bytes_per_output=3 * e))
                    # the generic path (k > 9), at the same shape, for comparison with the tiled kernel
                    vec = layout == "channels_last"
                    pat = (rf"dw_apply_generic_kernel<{re.escape(CXX_DTYPE[dtype])}, {act}, "
                           rf"{'true' if vec else 'false'}, {8 if vec and e == 2 else (4 if vec else 1)}>")
                    key = lookup(pat)
                    mix = sass.hot_loop_mix(code[key])
                    v = 8 if vec and e == 2 else (4 if vec else 1)
                    rows.append(_row("cuda", "dw_apply_generic_kernel (k>9 path)", "eval forward (generic)",
                                     shape_name, dtype, layout, arch, f"{v}-channel items", 256, res[key], mix,
                                     v / (k * k), 0, (k * k) * e + e, k * k,
                                     note="reference: every tap a global load; not launched at k<=9",
                                     floor_bytes_per_output=2 * e))
    rows += conv_act_bn_rows(shapes, dtypes, layouts, archs, cache_dir, log)
    return rows


# The CUDA epilogue kernels around the pointwise GEMM (csrc/cuda/conv_act_bn.cu; the GEMM is cuBLAS):
# (kernel, pass, global bytes per output as a function of e: the fp32 GEMM output T is read (and the
# statistics pass writes t back in place)).
CAB_KERNELS = (("cab_stats_partial_kernel", "pointwise training statistics", lambda e: 8),
               ("cab_apply_kernel", "pointwise eval / apply", lambda e: 4 + e),
               ("cab_backward_reduce_kernel", "pointwise backward reduce", lambda e: 2 * e),
               ("cab_backward_dt_kernel", "pointwise backward dt", lambda e: 3 * e))


def conv_act_bn_rows(shapes, dtypes, layouts, archs, cache_dir, log=print) -> list:
    rows = []
    for arch, tag, path, res, code in cuda_code("conv_act_bn.cu", archs, cache_dir, log):
        for shape_name in shapes:
            act = ACT_CODE[SHAPES[shape_name]["act"]]
            for dtype in dtypes:
                for kernel, pass_, nbytes in CAB_KERNELS:
                    pat = re.compile(rf"{kernel}<{re.escape(CXX_DTYPE[dtype])}, {act}>")
                    keys = [k for k in code if k[0] == tag and pat.search(sass.demangle_cached(k[1]))]
                    if len(keys) != 1:
                        raise LookupError(f"{pat.pattern}: {len(keys)} functions in {os.path.basename(path)}")
                    mix = sass.main_loop_mix(code[keys[0]])
                    rows.append(_row("cuda", kernel, pass_, shape_name, dtype, "both", arch, "grid-stride, 1 elem",
                                     256, res[keys[0]], mix, 1.0, 0, nbytes(DTYPE_BYTES[dtype]), 0,
                                     note="elementwise: one output per loop iteration"))
    return rows


# The Triton kernels of the report: (kernel, pass, constexprs, global bytes per output as functions of the
# element size e (moved, unique), conv FMA per output in units of k^2). The dt kernel writes an fp32 dt
# scratch that the dx kernel reads (4 bytes per output each). Their hot loop is the stencil-row loop
# (the k taps of one row unrolled, 8 outputs per thread), so outputs per loop iteration = FFMA in the loop /
# k^2. The backward dt kernel also recomputes t and accumulates dw (3 k^2 FMA per output).
TRITON_DW = (("_dw_forward_apply_kernel", "eval forward / training apply", {}, (lambda e: 2 * e, lambda e: 2 * e), 1),
             ("_dw_forward_stats_kernel", "training statistics", {}, (lambda e: e, lambda e: e), 1),
             ("_dw_backward_reduce_kernel", "backward reduce (pass 1)", {}, (lambda e: 2 * e, lambda e: 2 * e), 1),
             ("_dw_backward_dt_kernel", "backward dt + dw (pass 2a)", {"TRAINING": True},
              (lambda e: 2 * e + 4, lambda e: 2 * e), 2),
             ("_dw_backward_dx_kernel", "backward dx (pass 2b)", {}, (lambda e: 2 * e + 4, lambda e: e), 1))


def triton_rows(shapes, dtypes, layouts, archs, cache_dir, log=print, quick=False) -> list:
    """Every pruned autotune config of the depthwise kernels at each shape (sm_90; the apply kernel also
    for sm_80), plus the pointwise GEMM's configs at the layer's 1x1 conv."""
    try:
        from .triton import aot
    except ImportError as exc:
        log(f"  (Triton rows skipped: {exc})")
        return []
    plan = []
    for shape_name in shapes:
        s = SHAPES[shape_name]
        k, act = s["k"], ACT_CODE[s["act"]]
        for dtype in dtypes:
            for layout in layouts:
                for kernel, pass_, const, (moved, unique), fma_units in TRITON_DW:
                    hot = kernel == "_dw_forward_apply_kernel"
                    if not hot and (dtype != dtypes[0] or layout != "channels_last"):
                        continue  # the other passes: the main dtype, channels_last
                    cfgs = aot.pruned_configs(kernel, s["N"], s["C"], s["H"], s["W"], k=k, dtype=dtype,
                                              layout=layout, act=act)
                    for cfg in (cfgs[:1] if quick else cfgs) or [None]:
                        for arch in archs if hot and dtype == dtypes[0] and layout == "channels_last" else archs[:1]:
                            plan.append((aot.make_case(kernel, arch, dtype, layout, k, cfg, ACT=act, **const),
                                         shape_name, pass_, moved, unique, fma_units * k * k))
        cfgs = aot.pruned_configs("_cab_gemm_kernel", s["N"], s["C"], s["H"], s["W"], dtype=dtypes[0],
                                  layout="channels_last", act=act, cout=s["C"])
        for cfg in (cfgs[:1] if quick else cfgs) or [None]:
            plan.append((aot.make_case("_cab_gemm_kernel", archs[0], dtypes[0], "channels_last", None, cfg, ACT=act),
                         shape_name, "pointwise GEMM + act + BN epilogue", None, None, None))
    log(f"  compiling {len(plan)} Triton kernels ahead of time (sm_{archs}) ...", flush=True)
    results = aot.compile_cases([p[0] for p in plan], timeout_s=3600, out_dir=os.path.join(cache_dir, "triton"),
                                log=log)
    rows = []
    for (case, shape_name, pass_, moved, unique, fma_po), r in zip(plan, results):
        cfg = r.get("config") or case["config"]
        cfg_s = "x".join(str(v) for v in cfg["kwargs"].values()) + f" w{cfg['num_warps']} s{cfg['num_stages']}"
        if not r.get("ok"):
            log(f"  {r.get('case', case['kernel'])}: compile failed: {str(r.get('error'))[:200]}")
            continue
        res = sass.Resources(r["reg"], r["stack"], r["shared"], r["local"])
        code = sass.disassemble(r["cubin"], f"sm_{case['target']}")
        mix = sass.hot_loop_mix(next(iter(code.values()))) if code else sass.LoopMix(0, 0, False, 0, 0, {}, {})
        e = DTYPE_BYTES[case["dtype"]]
        threads = 32 * cfg["num_warps"]
        if fma_po is None:  # the GEMM: tensor cores; the per-output mix does not apply
            rows.append(_row("triton", case["kernel"], pass_, shape_name, case["dtype"], case["layout"],
                             case["target"], cfg_s, threads, res, mix, 0, r.get("shared_bytes", 0), 0, 0,
                             note=f"mma={r.get('mma')} wgmma={r.get('wgmma')}"))
            continue
        k = SHAPES[shape_name]["k"]
        outputs_per_loop = mix.fma_work / (k * k) if mix.fma_work else 0
        rows.append(_row("triton", case["kernel"], pass_, shape_name, case["dtype"], case["layout"], case["target"],
                         cfg_s, threads, res, mix, outputs_per_loop, r.get("shared_bytes", 0), moved(e), fma_po,
                         note="outputs/loop = loop FFMA / k^2", floor_bytes_per_output=unique(e)))
    return rows


COLUMNS = [("backend", 6), ("kernel", 34), ("shape", 7), ("dtype", 5), ("layout", 13), ("target", 6),
           ("regs", 4), ("stack", 5), ("local", 5), ("shared_dynamic", 7), ("occupancy", 5),
           ("instr_per_output", 8), ("ffma_fraction", 6), ("ldg_per_output", 6), ("lds_per_output", 6),
           ("int_per_output", 7), ("global_bytes_per_output", 7), ("bound_us", 8), ("floor_us", 8),
           ("bound_over_floor", 6)]


def format_table(rows) -> str:
    head = " ".join(f"{n[:w]:>{w}}" for n, w in COLUMNS)
    lines = [head]
    for r in rows:
        d = dataclasses.asdict(r)
        lines.append(" ".join(f"{str(d[n])[:w]:>{w}}" for n, w in COLUMNS))
    return "\n".join(lines)


def measured_vs_static(rows, csv_path) -> list:
    """measured / static bound for the kernels a benchmark row times alone: the depthwise block's eval
    forward is one launch of dw_conv_tile_kernel<kApply> (the `fused_cuda` variant of `bench`)."""
    out = []
    with open(csv_path) as f:
        for m in csv.DictReader(f):
            if (m.get("op"), m.get("mode"), m.get("variant")) != ("dw_block", "eval", "fused_cuda") or not m.get("median_ms"):
                continue
            for r in rows:
                if (r.backend, r.kernel, r.shape, r.dtype, r.layout, r.target) == (
                        "cuda", "dw_conv_tile_kernel<kApply>", m.get("shape"), m.get("dtype"), "channels_last", 90):
                    scale = float(m["batch"]) / SHAPES[r.shape]["N"] if m.get("batch") else 1.0
                    bound_ms = r.bound_us * scale / 1e3
                    out.append(f"{r.kernel} {r.shape} {r.dtype}: measured {float(m['median_ms']):.3f} ms, static bound "
                               f"{bound_ms:.3f} ms, measured/static {float(m['median_ms']) / bound_ms:.2f}")
    return out


MD_COLUMNS = [("kernel", "kernel"), ("shape", "shape"), ("dtype", "dtype"), ("layout", "layout"),
              ("target", "sm"), ("regs", "regs"), ("stack", "stack B"), ("shared_dynamic", "dyn smem B"),
              ("occupancy", "occupancy"), ("instr_per_output", "instr/output"), ("ffma_per_output", "FFMA/output"),
              ("ffma_fraction", "FFMA share"), ("ldg_per_output", "LDG/output"), ("lds_per_output", "LDS/output"),
              ("int_per_output", "int/output"), ("global_bytes_per_output", "global B/output"),
              ("bound_us", "static bound us"), ("floor_us", "floor us"), ("bound_over_floor", "bound/floor")]


def format_markdown(rows) -> str:
    out = ["| " + " | ".join(h for _, h in MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for r in rows:
        d = dataclasses.asdict(r)
        out.append("| " + " | ".join(f"{r.backend}: {d[n]}" if n == "kernel" else str(d[n]) for n, _ in MD_COLUMNS)
                   + " |")
    return "\n".join(out)


def summary_rows(rows) -> list:
    """The RESULTS.md view: bf16, channels_last (the GPU fast path), the first kept config per kernel, shape
    and target."""
    seen, out = set(), []
    for r in rows:
        key = (r.backend, r.kernel, r.shape, r.target)
        if r.dtype == "bf16" and r.layout in ("channels_last", "both") and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convmixer_kernels inspect", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="inspect_out", help="directory for report.csv, report.json, cubins")
    ap.add_argument("--arch", default="90,80", help="compute capabilities (default 90,80)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"layer shapes ({', '.join(SHAPES)})")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--layouts", default="channels_last,nchw")
    ap.add_argument("--no-triton", action="store_true", help="only the CUDA kernels")
    ap.add_argument("--no-cuda", action="store_true", help="only the Triton kernels")
    ap.add_argument("--quick", action="store_true", help="Triton: the first pruned config per kernel only")
    ap.add_argument("--markdown", action="store_true",
                    help="also write report.md (every row) and summary.md (the RESULTS.md table)")
    ap.add_argument("--measured", help="a bench_cuda.csv of `python -m convmixer_kernels bench` on a GPU: prints "
                                       "measured / static for the kernels it times alone")
    a = ap.parse_args(argv)
    archs = [int(x) for x in a.arch.split(",")]
    shapes = [s if s in SHAPES else next(n for n in SHAPES if n.startswith(s)) for s in a.shapes.split(",")]
    dtypes, layouts = a.dtypes.split(","), a.layouts.split(",")
    cache = os.path.join(a.out, "cubin")
    print(f"static report: shapes {shapes}, {dtypes}, {layouts}, sm_{archs}; H200 constants: "
          f"{FMA_PEAK / 1e12:.1f} T FMA/s, {ISSUE_RATE / 1e12:.1f} T instr/s, {HBM_BW / 1e12:.1f} TB/s", flush=True)
    rows = []
    if not a.no_cuda:
        print("CUDA kernels:", flush=True)
        rows += cuda_rows(shapes, dtypes, layouts, archs, cache, log=print)
    if not a.no_triton:
        print("Triton kernels:", flush=True)
        rows += triton_rows(shapes, dtypes, layouts, archs, cache, log=print, quick=a.quick)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "report.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(dict(constants=dict(H200=H200, fma_peak=FMA_PEAK, issue_rate=ISSUE_RATE), rows=[dataclasses.asdict(r) for r in rows]), f, indent=1)
    print(format_table(rows))
    if a.markdown:
        with open(os.path.join(a.out, "report.md"), "w") as f:
            f.write(format_markdown(rows) + "\n")
        with open(os.path.join(a.out, "summary.md"), "w") as f:
            f.write(format_markdown(summary_rows(rows)) + "\n")
    print(f"wrote {a.out}/report.csv and report.json ({len(rows)} rows). Static estimates, not measurements.")
    if a.measured and os.path.exists(a.measured):
        print("measured / static:")
        for line in measured_vs_static(rows, a.measured) or ["  (no fused_cuda dw_block eval rows in the CSV)"]:
            print("  " + line)
    bad = [r for r in rows if (r.stack or r.local) and "generic" not in r.kernel]
    if bad:
        print(f"{len(bad)} kernel(s) with stack/local memory: " + ", ".join(sorted({r.kernel for r in bad})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
