"""Ahead-of-time compile check of the Triton kernels for real GPUs (sm_90 and sm_80), with no GPU.

The interpreter (TRITON_INTERPRET=1, the CPU path of tests/test_triton.py) never runs Triton's compiler:
layouts, tl.dot lowering to tensor cores, register allocation and ptxas never happen there. This module
runs the real pipeline  Python AST -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (ptxas bundled in the
triton wheel)  for every kernel the launchers start, through

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cap, 32),
                   options=dict(num_warps=..., num_stages=...))

No driver or GPU is needed. The compile runs in a subprocess (this file run as a script) with
TRITON_INTERPRET removed from the environment: tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported, and under the interpreter `triton.jit` returns interpreter objects and the kernel modules
pick their interpreter-sized autotune configs.

What is compiled (the argument types mimic the GPU launch: pointers 16-byte aligned, int arguments
i32 and divisible by 16 as at the ConvMixer shapes, and the unit stride specialized to the constant 1
as Triton does at run time: the channel stride in channels_last, the column stride in NCHW):
  default plan  every autotune config of every autotuned kernel once for sm_90, cycling through the
                dtypes (fp32, fp16, bf16), both layouts, the activations and the kernel's modes
                (MODE / TRAINING / FORM_DT / APPLY_BN / AFFINE), depthwise k=3; the two reduction kernels of common.py with
                their launcher's tile sizes; for every kernel its largest config in bf16 for sm_80;
                and k=7 (sm_80, fp16) and k=9 (sm_90, bf16) for the eval apply kernel (see HEAVY: a
                large k costs seconds of LLVM time per kernel). 69 compiles, ~50-70 s on 2 cores.
  full plan     CMK_AOT_FULL=1: every config x dtype x k x layout for both targets (hundreds of
                compiles, ~30+ minutes on 2 cores; for a machine with time to spare).
Also reported (not asserted): registers, local memory (spills) and stack per kernel, read from the cubin
with the cuobjdump bundled in the wheel. Run `python tests/test_triton_aot.py [--full]` (with
TRITON_INTERPRET unset) to see the table.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERNEL_DIR = os.path.join(ROOT, "convmixer_kernels", "triton")
MODULES = ("common", "dw_block", "conv_act_bn")
TARGETS = (90, 80)
DTYPES = ("fp32", "fp16", "bf16")
KS = (3, 7, 9)
LAYOUTS = ("channels_last", "nchw")
# the subprocess as a whole; the default plan takes ~50-70 s on 2 cores
TIMEOUT_S = 7200 if os.environ.get("CMK_AOT_FULL") == "1" else 170


def launched_kernels() -> dict:
    """{kernel name: module} for every @triton.jit function of convmixer_kernels/triton/ that some launcher
    starts (`name[grid](...)`); the other @triton.jit functions are device functions compiled into them."""
    jit, sources = {}, {}
    for mod in MODULES:
        src = open(os.path.join(KERNEL_DIR, mod + ".py")).read()
        sources[mod] = src
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                jit[node.name] = mod
    every = "\n".join(sources.values())
    return {name: mod for name, mod in jit.items() if f"{name}[" in every}


# --- worker: runs without TRITON_INTERPRET ------------------------------------------------------------

# Pointer arguments that hold activations/weights (the input dtype); every other pointer holds fp32
# accumulation data (BN parameters and statistics, partial sums, the depthwise dt scratch).
DATA_PTRS = {"x", "w", "b", "y", "t", "dy", "dx", "dT", "out"}
# Constexpr values the launchers pass that are not autotuned (non-interpreter branch of the launchers).
FIXED = {
    "_bn_stats_finalize_kernel": {"BLOCK_R": 64, "BLOCK_C": 128},
    "_sum_rows_kernel": {"BLOCK_R": 32, "BLOCK_X": 256},
}


# k=7 and k=9 unroll 49/81 shifted tile loads: 2-30 s of compile per depthwise kernel on these 2 cores
# (sm_80 fp16 k=7: 2.3 s; sm_90 bf16 k=9: 16 s), so the default plan compiles them for one kernel: the
# eval apply kernel (the benchmark target) with its largest config. CMK_AOT_FULL=1 does everything.
HEAVY = {"_dw_forward_apply_kernel": ((80, "fp16", 7), (90, "bf16", 9))}


def _is_stride(name: str) -> bool:
    # sxn, sxc, sxh, sxw, syn, ..., son, sdc, stw: s + tensor letter + dimension letter
    return len(name) == 3 and name[0] == "s" and name[1].isalpha() and name[2] in "nchw"


def _case_args(fn, case) -> tuple:
    """(signature, constexprs, attrs) for triton.compile from a case's dtype, layout and constexprs."""
    import triton.language as tl
    unit = "c" if case["layout"] == "channels_last" else "w"
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in case["const"]:
            v = case["const"][name]
            sig[name] = "constexpr"
            const[name] = getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
        elif name.endswith("_ptr"):
            sig[name] = "*" + (case["dtype"] if name[:-4] in DATA_PTRS else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif _is_stride(name) and name[2] == unit:
            sig[name], const[name] = "constexpr", 1  # Triton specializes an int argument equal to 1
        elif name == "P":  # runtime patch size of the elementwise kernels: 1 for the pointwise block
            sig[name], const[name] = "constexpr", case["const_P"]
        elif name == "eps":
            sig[name] = "fp32"
        else:  # sizes and strides: i32, multiples of 16 at the ConvMixer shapes
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _jit_fn(obj):
    """The JITFunction under an Autotuner (or other wrapper)."""
    from triton.runtime.jit import JITFunction
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _config_size(cfg) -> int:
    n = 1
    for v in cfg.kwargs.values():
        n *= v
    return n * 1000 + cfg.num_warps


def _plan(full: bool):
    """Cases: dicts with kernel, module, target, dtype, layout, const (constexpr values), num_warps,
    num_stages. Imports the kernel modules (without TRITON_INTERPRET: the GPU autotune configs)."""
    import importlib
    kernels = launched_kernels()
    cases = []

    def add(name, mod, target, dtype, layout, const, cfg=None, p=1):
        c = dict(kernel=name, module=mod, target=target, dtype=dtype, layout=layout, const_P=p,
                 const=dict(const), num_warps=4, num_stages=3)
        if cfg is not None:
            c["const"].update(cfg.kwargs)
            c["num_warps"], c["num_stages"] = cfg.num_warps, cfg.num_stages
        c["const"].update(FIXED.get(name, {}))
        cases.append(c)

    for name, mod in kernels.items():
        obj = getattr(importlib.import_module(f"convmixer_kernels.triton.{mod}"), name)
        configs = list(getattr(obj, "configs", [None]))
        fn = _jit_fn(obj)
        args = set(fn.arg_names)
        largest = max(configs, key=_config_size) if configs[0] is not None else None

        def const_for(i, k, dtype):
            c = {"ACC": "tl.float32"}
            if "K" in args:
                c["K"] = k
            if "KK_PAD" in args:
                c["KK_PAD"] = 1 << (k * k - 1).bit_length()
            if "ACT" in args:
                c["ACT"] = i % 3
            if "TRAINING" in args:
                c["TRAINING"] = bool(i % 2 == 0)
            if "FORM_DT" in args:  # (FORM_DT, TRAINING): the launcher's three combinations
                c["FORM_DT"], c["TRAINING"] = ((True, True), (False, True), (True, False))[i % 4 % 3]
            if "MODE" in args:
                c["MODE"] = i % 3
                c["STORE_T"] = c["MODE"] != 0 or i % 2 == 1
            if "APPLY_BN" in args:  # the cross-layer fused path (apply_bn false) every other case
                c["APPLY_BN"] = i % 2 == 0
            if "AFFINE" in args:  # the depthwise block's input affine (cross-layer fusion)
                c["AFFINE"] = i % 2 == 1
            if "USE_DOT" in args:
                c["USE_DOT"] = True
            if "BLOCK_M" in args and name == "_cab_gemm_kernel":
                c["BLOCK_M"] = 128  # conv_act_bn.GEMM_BLOCK_M (fixed, not tuned)
            if "P" in args and name in ("_cab_gemm_kernel", "_cab_dweight_kernel", "_cab_dinput_kernel"):
                c["P"] = 7 if i % 4 == 3 else 1  # now and then the stem (patch 7, Kd = 3*49)
            return {k_: v for k_, v in c.items() if k_ in args}

        if full:
            for target in TARGETS:
                for i, cfg in enumerate(configs):
                    for dtype in DTYPES:
                        for k in (KS if "K" in args else (None,)):
                            for layout in LAYOUTS:
                                add(name, mod, target, dtype, layout, const_for(i, k, dtype), cfg)
            continue
        has_data = any(a[:-4] in DATA_PTRS for a in fn.arg_names if a.endswith("_ptr"))
        n = max(len(configs), 3 if has_data else 1)
        for i in range(n):  # every config and every dtype at least once; k=3 (see HEAVY)
            dtype = DTYPES[i % 3]
            add(name, mod, 90, dtype, LAYOUTS[i % 2], const_for(i, 3, dtype), configs[i % len(configs)])
        add(name, mod, 80, "bf16", "channels_last", const_for(0, 3, "bf16"), largest)
        for target, dtype, k in HEAVY.get(name, ()):
            add(name, mod, target, dtype, "channels_last", const_for(0, k, dtype), largest)
    return cases


def _resources(cubin: bytes, tmpdir: str) -> dict:
    """REG / STACK / SHARED / LOCAL of the kernel, from `cuobjdump --dump-resource-usage` (bundled)."""
    try:
        from triton import knobs
        tool = knobs.nvidia.cuobjdump.path
        path = os.path.join(tmpdir, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=30).stdout
    except Exception as e:  # informational only
        return {"resource_error": f"{type(e).__name__}: {e}"}
    res = {}
    for line in out.splitlines():
        if "REG:" in line:
            for tok in line.split():
                key, _, val = tok.partition(":")
                if key in ("REG", "STACK", "SHARED", "LOCAL") and val.isdigit():
                    res[key.lower()] = int(val)
    return res


def _label(c) -> str:
    keys = [k for k in ("K", "ACT", "MODE", "STORE_T", "TRAINING", "FORM_DT", "APPLY_BN", "AFFINE", "P")
            if k in c["const"]]
    blocks = "x".join(str(v) for k, v in c["const"].items() if k.startswith("BLOCK_"))
    extra = " ".join(f"{k}={c['const'][k]}" for k in keys)
    return (f"{c['kernel']} sm_{c['target']} {c['dtype']} {c['layout']} {blocks} w{c['num_warps']}"
            f" s{c['num_stages']} {extra}")


def worker_main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="AOT-compile the Triton kernels (no GPU needed)")
    ap.add_argument("--full", action="store_true", help="every config x dtype x k x layout x target")
    ap.add_argument("--json", default=None, help="write the per-case results here")
    ap.add_argument("--only", default=None, help="comma list of kernel names")
    ap.add_argument("--limit", type=int, default=0, help="compile at most this many cases (0: all)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it (the interpreter never compiles)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = args.full or os.environ.get("CMK_AOT_FULL") == "1"
    cases = _plan(full)
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c["kernel"] in keep]
    if args.limit:
        cases = cases[:args.limit]
    import importlib
    results = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for c in cases:
            obj = getattr(importlib.import_module(f"convmixer_kernels.triton.{c['module']}"), c["kernel"])
            fn = _jit_fn(obj)
            sig, const, attrs = _case_args(fn, c)
            t0 = time.perf_counter()
            r = dict(case=_label(c), kernel=c["kernel"], target=c["target"], dtype=c["dtype"], layout=c["layout"],
                     const={k: str(v) for k, v in c["const"].items()}, num_warps=c["num_warps"])
            try:
                ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                    target=GPUTarget("cuda", c["target"], 32),
                                    options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
                r.update(ok=True, shared_bytes=ck.metadata.shared, **_resources(ck.asm["cubin"], tmp))
                ptx = ck.asm.get("ptx", "")
                r["mma"] = ("mma.sync" in ptx) or ("wgmma" in ptx)
                r["wgmma"] = "wgmma" in ptx
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                r.update(ok=False, error=msg[-3000:])
            r["seconds"] = round(time.perf_counter() - t0, 2)
            results.append(r)
            status = "ok  " if r["ok"] else "FAIL"
            res = (f"regs={r.get('reg', '?')} local={r.get('local', '?')} stack={r.get('stack', '?')} "
                   f"smem={r.get('shared_bytes', '?')}" if r["ok"] else r["error"].splitlines()[0][:200])
            print(f"{status} {r['seconds']:6.2f}s {r['case']}  {res}", file=sys.stderr, flush=True)
    summary = dict(triton=triton.__version__, full=full, n=len(results), seconds=round(time.perf_counter() - t_all, 1),
                   results=results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    bad = [r for r in results if not r["ok"]]
    print(f"[aot] {len(results) - len(bad)}/{len(results)} compiled in {summary['seconds']}s "
          f"(triton {triton.__version__})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(worker_main(sys.argv[1:]))


# --- pytest side ----------------------------------------------------------------------------------------

import pytest  # noqa: E402

KERNELS = launched_kernels()


def _skip_reason():
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    spec = importlib.util.find_spec("triton")
    tdir = os.path.dirname(spec.origin)
    if not os.path.isdir(os.path.join(tdir, "backends", "nvidia")):
        return "this triton has no NVIDIA backend (triton/backends/nvidia missing)"
    if not (os.path.exists(os.path.join(tdir, "backends", "nvidia", "bin", "ptxas")) or os.environ.get("TRITON_PTXAS_PATH")):
        return "no ptxas: neither the triton wheel's backends/nvidia/bin/ptxas nor TRITON_PTXAS_PATH"
    return None


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(f"AOT compile check not possible: {reason}")
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile for real, whatever ~/.triton/cache holds
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    path = out / "aot.json"
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", str(path)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"AOT compile did not finish in {TIMEOUT_S}s; last output:\n{(e.stderr or b'')[-3000:]}")
    if not path.exists():
        pytest.fail(f"AOT worker crashed (rc={proc.returncode}):\n{proc.stderr[-5000:]}")
    return json.loads(path.read_text()), proc.stderr


def test_kernel_discovery():
    assert {"_dw_forward_apply_kernel", "_cab_gemm_kernel", "_bn_stats_finalize_kernel"} <= set(KERNELS), KERNELS


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_compiles_for_sm90_and_sm80(aot_results, kernel):
    summary, log = aot_results
    mine = [r for r in summary["results"] if r["kernel"] == kernel]
    assert mine, f"{kernel}: no AOT case was planned for this kernel (add it to _plan)"
    assert {r["target"] for r in mine} == set(TARGETS), f"{kernel}: targets compiled {sorted({r['target'] for r in mine})}"
    bad = [f"{r['case']}: {r['error']}" for r in mine if not r["ok"]]
    assert not bad, "\n\n".join(bad)


def test_plan_covers_configs_dtypes_and_kernel_sizes(aot_results):
    summary, _ = aot_results
    for kernel in KERNELS:
        mine = [r for r in summary["results"] if r["kernel"] == kernel and r["target"] == 90]
        dtypes = {r["dtype"] for r in mine}
        if kernel == "_bn_stats_finalize_kernel":
            continue  # fp32 pointers only: nothing dtype-generic
        assert dtypes == set(DTYPES), f"{kernel}: dtypes {dtypes}"
    ks = {r["const"]["K"] for r in summary["results"] if "K" in r["const"]}
    assert {"3", "7", "9"} <= ks, f"depthwise kernel sizes compiled: {ks}"


def test_dot_kernels_use_tensor_cores(aot_results):
    """The GEMM kernels must lower a 16-bit tl.dot to tensor-core instructions (sm_80: mma.sync; sm_90:
    wgmma or mma.sync). fp32 operands use input_precision="ieee": plain FMA, by design (no TF32)."""
    summary, _ = aot_results
    checked = 0
    for r in summary["results"]:
        if r["ok"] and r["dtype"] != "fp32" and r["kernel"] in ("_cab_gemm_kernel", "_cab_dweight_kernel",
                                                                 "_cab_dinput_kernel"):
            checked += 1
            assert r.get("mma"), f"{r['case']}: no mma/wgmma instruction in the PTX"
    assert checked


def test_report_register_spills(aot_results):
    """Not a failure: warns about kernels that need stack/local memory (spills) or 255 registers, which
    the interpreter never shows. The table is in the warning (pytest -rw) and in the worker's output."""
    import warnings
    summary, _ = aot_results
    heavy = [f"{r['case']}: regs={r.get('reg')} stack={r.get('stack')} local={r.get('local')}"
             for r in summary["results"] if r["ok"] and (r.get("stack", 0) > 64 or r.get("local", 0) > 0)]
    if heavy:
        warnings.warn("Triton kernels with spills / large stack frames:\n  " + "\n  ".join(heavy))
