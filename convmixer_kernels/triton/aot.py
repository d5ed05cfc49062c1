"""Ahead-of-time (AOT) compile of the Triton kernels for real GPUs, with no GPU and no driver.

The interpreter (TRITON_INTERPRET=1, the CPU path of the tests) never runs Triton's compiler: layouts,
tl.dot lowering, register allocation and ptxas never happen there. This module runs the real pipeline
Python AST -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (ptxas from the triton wheel) for one kernel +
config + target, and reads the kernel's resources from the cubin with the wheel's cuobjdump:

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cap, 32),
                   options=dict(num_warps=..., num_stages=...))

The argument types mimic the GPU launch: pointers 16-byte aligned, int arguments i32 and divisible by
16 (as at the ConvMixer shapes), and the unit stride specialized to the constant 1 as Triton does at run
time (the channel stride in channels_last, the column stride in NCHW).

API (safe to call from a process that has TRITON_INTERPRET=1 set: the work runs in a subprocess):

  compile_cases(cases, timeout_s=600, out_dir=None) -> list[dict]
      cases: dicts made by make_case() (or by hand, same keys). Compiles each in one subprocess without
      TRITON_INTERPRET and a fresh TRITON_CACHE_DIR; returns per case (same order):
        case (a one-line label), kernel, module, target (90/80), dtype, layout, k, const (every constexpr,
        the config's kwargs included), config = {kwargs, num_warps, num_stages}, ok, error (when not ok),
        reg, local, stack (bytes of local memory / stack frame: spills), shared_bytes (static + Triton's
        shared memory, from the compiled metadata), shared (cuobjdump's static SHARED), cubin (path of the
        written .cubin in out_dir, for nvdisasm; None without out_dir), mma / wgmma (tensor-core
        instructions in the PTX), seconds.
  make_case(kernel, target=90, dtype="bf16", layout="channels_last", k=None, config=None, **const)
      -> case dict. config: a triton.Config-like dict {kwargs, num_warps, num_stages} (as returned by
      pruned_configs / kernel_info), or None (the launcher's fixed sizes, 4 warps). const: constexpr
      overrides (ACT=..., MODE=..., AFFINE=..., TRAINING=...); the rest gets defaults (ACC fp32, K=k,
      KK_PAD from k, ACT=0, AFFINE=False, G_DTYPE the case's dtype, ...).
  pruned_configs(kernel, N, C, H, W, k=None, dtype="bf16", layout="channels_last", act=0, mode=None,
                 cout=None, patch=1, timeout_s=120) -> list[dict]
      the configs the kernel's autotuner would benchmark at that problem after its prune_configs_by
      (GPU config lists: runs in a subprocess when TRITON_INTERPRET=1 is set here).
  kernel_info(problem=None, timeout_s=120) -> {kernel: {module, args, configs[, pruned]}}: every launched
      kernel with its full (GPU) autotune config list ([None] when it is not autotuned) and, given a
      problem (pruned_configs' keyword arguments), the configs left after pruning there.
  launched_kernels() -> {kernel name: module name} (source scan, no triton import).

Command line (TRITON_INTERPRET unset): python -m convmixer_kernels.triton.aot --kernel NAME [--k 9]
[--target 90] [--dtype bf16] [--layout channels_last] [--out DIR]: compiles every config of the kernel
and prints the resource table.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(KERNEL_DIR))
MODULES = ("common", "dw_block", "conv_act_bn")

# Pointer arguments that hold activations/weights (the input dtype); every other pointer holds fp32
# accumulation data (BN parameters and statistics, partial sums, the depthwise dt scratch).
DATA_PTRS = {"x", "w", "b", "y", "t", "dy", "dx", "dT", "out"}
# Constexpr values the launchers pass that are not autotuned (non-interpreter branch of the launchers).
FIXED = {
    "_bn_stats_finalize_kernel": {"BLOCK_R": 64, "BLOCK_C": 128},
    "_sum_rows_kernel": {"BLOCK_R": 32, "BLOCK_X": 256},
    "_cab_gemm_kernel": {"BLOCK_M": 128},  # conv_act_bn.GEMM_BLOCK_M (fixed, not tuned)
}
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def launched_kernels() -> dict:
    """{kernel name: module} for every @triton.jit function of convmixer_kernels/triton/ that some launcher
    starts (`name[grid](...)`); the other @triton.jit functions are device functions compiled into them."""
    jit, sources = {}, {}
    for mod in MODULES:
        with open(os.path.join(KERNEL_DIR, mod + ".py")) as f:
            src = f.read()
        sources[mod] = src
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                jit[node.name] = mod
    every = "\n".join(sources.values())
    return {name: mod for name, mod in jit.items() if f"{name}[" in every}


# --- case construction (pure Python) -------------------------------------------------------------------

def make_case(kernel: str, target: int = 90, dtype: str = "bf16", layout: str = "channels_last", k=None,
              config=None, module=None, **const) -> dict:
    """A case dict for compile_cases (see the module docstring). Constexprs the kernel does not take are
    dropped in the worker, so defaults for every kernel family can be given here."""
    if module is None:
        module = launched_kernels()[kernel]
    c = {"ACC": "tl.float32", "ACT": 0, "AFFINE": False, "TRAINING": True, "MODE": 0, "STORE_T": False,
         "APPLY_BN": True, "FORM_DT": True, "USE_DOT": True, "P": 1,
         "G_DTYPE": "tl." + _TORCH_DTYPES[dtype]}  # the stored g's dtype: the activations'
    if k is not None:
        c["K"] = k
        c["KK_PAD"] = 1 << (k * k - 1).bit_length()
    c.update(FIXED.get(kernel, {}))
    c.update(const)
    cfg = dict(kwargs={}, num_warps=4, num_stages=3)
    if config is not None:
        cfg = dict(kwargs=dict(config.get("kwargs", {})), num_warps=config.get("num_warps", 4),
                   num_stages=config.get("num_stages", 3))
        if config.get("maxnreg"):
            cfg["maxnreg"] = config["maxnreg"]
        c.update(cfg["kwargs"])
    return dict(kernel=kernel, module=module, target=int(target), dtype=dtype, layout=layout, k=k, const=c,
                config=cfg)


def config_dict(cfg) -> dict | None:
    """triton.Config -> {kwargs, num_warps, num_stages} (JSON-able)."""
    if cfg is None:
        return None
    d = dict(kwargs=dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if getattr(cfg, "maxnreg", None):
        d["maxnreg"] = cfg.maxnreg
    return d


def label(c: dict) -> str:
    const = c["const"]
    keys = [k for k in ("K", "ACT", "MODE", "STORE_T", "TRAINING", "FORM_DT", "APPLY_BN", "AFFINE", "P")
            if k in const]
    blocks = "x".join(f"{v}" for k, v in c["config"]["kwargs"].items()) or \
        "x".join(str(v) for k, v in const.items() if k.startswith("BLOCK_"))
    extra = " ".join(f"{k}={const[k]}" for k in keys)
    reg = f" r{c['config']['maxnreg']}" if c["config"].get("maxnreg") else ""
    return (f"{c['kernel']} sm_{c['target']} {c['dtype']} {c['layout']} {blocks} w{c['config']['num_warps']}"
            f" s{c['config']['num_stages']}{reg} {extra}")


# --- worker side (TRITON_INTERPRET unset) ------------------------------------------------------------

def _require_compiler():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter never compiles (use compile_cases, "
                           "which runs a subprocess without it)")


def _kernel_object(kernel: str, module: str | None = None):
    import importlib
    module = module or launched_kernels()[kernel]
    return getattr(importlib.import_module(f"convmixer_kernels.triton.{module}"), kernel)


def _jit_fn(obj):
    """The JITFunction under an Autotuner (or other wrapper)."""
    from triton.runtime.jit import JITFunction
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


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
        elif name == "eps":
            sig[name] = "fp32"
        else:  # sizes and strides: i32, multiples of 16 at the ConvMixer shapes
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def read_resources(cubin_path: str) -> dict:
    """{reg, stack, shared, local} of the kernel in a cubin, from `cuobjdump --dump-resource-usage`
    (the cuobjdump in triton/backends/nvidia/bin). LOCAL is spill/local-array memory per thread, STACK
    the stack frame per thread (ptxas puts spills there on recent targets): both 0 for a spill-free kernel."""
    try:
        from triton import knobs
        tool = knobs.nvidia.cuobjdump.path
        out = subprocess.run([tool, "--dump-resource-usage", cubin_path], capture_output=True, text=True,
                             timeout=60).stdout
    except Exception as e:
        return {"resource_error": f"{type(e).__name__}: {e}"}
    res = {}
    for line in out.splitlines():
        if "REG:" in line:
            for tok in line.split():
                key, _, val = tok.partition(":")
                if key in ("REG", "STACK", "SHARED", "LOCAL") and val.isdigit():
                    res[key.lower()] = int(val)
    return res


def compile_one(case: dict, out_dir: str) -> dict:
    """Compile one case in this process (TRITON_INTERPRET must be unset); the cubin goes to out_dir."""
    _require_compiler()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _jit_fn(_kernel_object(case["kernel"], case.get("module")))
    const = {k: v for k, v in case["const"].items() if k in fn.arg_names}
    case = dict(case, const=const)
    r = dict(case=label(case), kernel=case["kernel"], module=case.get("module"), target=case["target"],
             dtype=case["dtype"], layout=case["layout"], k=case.get("k"), config=case["config"],
             const={k: str(v) for k, v in const.items()}, num_warps=case["config"]["num_warps"], cubin=None)
    sig, consts, attrs = _case_args(fn, case)
    t0 = time.perf_counter()
    try:
        cfg = case["config"]
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if cfg.get("maxnreg"):
            options["maxnreg"] = cfg["maxnreg"]
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", case["target"], 32), options=options)
        tag = "_".join([case["kernel"].strip("_"), f"sm{case['target']}", case["dtype"], case["layout"],
                        f"k{case.get('k')}"] + [f"{k}{v}" for k, v in cfg["kwargs"].items()]
                       + [f"w{cfg['num_warps']}", f"s{cfg['num_stages']}"]
                       + ([f"r{cfg['maxnreg']}"] if cfg.get("maxnreg") else []))
        path = os.path.join(out_dir, tag + ".cubin")
        n = 1
        while os.path.exists(path):  # same kernel/config with other constexprs (ACT, MODE, ...)
            n += 1
            path = os.path.join(out_dir, f"{tag}_{n}.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        r.update(ok=True, shared_bytes=ck.metadata.shared, cubin=path, **read_resources(path))
        for key in ("reg", "local", "stack", "shared"):
            r.setdefault(key, None)
        ptx = ck.asm.get("ptx", "")
        r["mma"] = ("mma.sync" in ptx) or ("wgmma" in ptx)
        r["wgmma"] = "wgmma" in ptx
    except Exception as e:
        r.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:])
    r["seconds"] = round(time.perf_counter() - t0, 2)
    return r


def _fmt(r: dict) -> str:
    if not r["ok"]:
        return f"FAIL {r['seconds']:6.2f}s {r['case']}  {r['error'].splitlines()[0][:200]}"
    return (f"ok   {r['seconds']:6.2f}s {r['case']}  regs={r.get('reg')} local={r.get('local')} "
            f"stack={r.get('stack')} smem={r.get('shared_bytes')}")


class _FakeTensor:
    """What a prune function may ask of a tensor argument: dtype, element_size(), stride(), shape."""

    def __init__(self, dtype, shape, strides):
        self.dtype, self.shape, self._strides = dtype, tuple(shape), tuple(strides)

    def element_size(self):
        import torch
        return torch.empty(0, dtype=self.dtype).element_size()

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]


def _pruned_configs_here(kernel, N, C, H, W, k=None, dtype="bf16", layout="channels_last", act=0, mode=None,
                         cout=None, patch=1):
    import torch
    obj = _kernel_object(kernel)
    configs = list(getattr(obj, "configs", []) or [])
    if not configs:
        return []
    fn = _jit_fn(obj)
    tdt = getattr(torch, _TORCH_DTYPES[dtype])
    cout = C if cout is None else cout
    Ho, Wo = H // patch, W // patch
    shape = (N, C, H, W)
    strides = ((C * H * W, 1, W * C, C) if layout == "channels_last" else (C * H * W, H * W, W, 1))
    scalars = dict(N=N, C=C, H=H, W=W, Cin=C, Cout=cout, Ho=Ho, Wo=Wo, Kd=C * patch * patch, M=N * H * W, P=patch)
    nargs = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            nargs[name] = _FakeTensor(tdt if name[:-4] in DATA_PTRS else torch.float32, shape, strides)
        elif name in scalars:
            nargs[name] = scalars[name]
        elif _is_stride(name):
            nargs[name] = strides["nchw".index(name[2])]
    kw = {"ACT": act, "ACC": "tl.float32"}
    if k is not None:
        kw.update(K=k, KK_PAD=1 << (k * k - 1).bit_length())
    if mode is not None:
        kw["MODE"] = mode
    kw = {a: v for a, v in kw.items() if a in fn.arg_names}
    prune = getattr(obj, "early_config_prune", None)
    if prune:
        configs = prune(configs, nargs, **kw)
    return [config_dict(c) for c in configs]


def _kernel_info_here(problem=None):
    out = {}
    for name, mod in launched_kernels().items():
        obj = _kernel_object(name, mod)
        configs = list(getattr(obj, "configs", [None]) or [None])
        out[name] = dict(module=mod, args=list(_jit_fn(obj).arg_names), configs=[config_dict(c) for c in configs])
        if problem is not None:
            out[name]["pruned"] = _pruned_configs_here(name, **problem) if configs[0] is not None else [None]
    return out


# --- subprocess plumbing ---------------------------------------------------------------------------------

def _worker_env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache_dir  # compile for real, whatever ~/.triton/cache holds
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_worker(task: str, payload, timeout_s: float, log=None):
    """Runs `python -m convmixer_kernels.triton.aot --worker TASK in.json out.json` without TRITON_INTERPRET;
    returns the decoded output. The worker's stderr (progress lines) goes to `log` (a callable) if given."""
    with tempfile.TemporaryDirectory(prefix="cmk_aot_") as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as f:
            json.dump(payload, f)
        cmd = [sys.executable, "-m", "convmixer_kernels.triton.aot", "--worker", task, src, dst]
        try:
            proc = subprocess.run(cmd, env=_worker_env(os.path.join(tmp, "cache")), cwd=ROOT, capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            raise TimeoutError(f"AOT worker did not finish in {timeout_s}s; last output:\n{err[-3000:]}") from None
        if log is not None:
            log(proc.stderr)
        if not os.path.exists(dst):
            raise RuntimeError(f"AOT worker crashed (rc={proc.returncode}):\n{proc.stderr[-5000:]}")
        with open(dst) as f:
            return json.load(f)


def compile_cases(cases: list, timeout_s: float = 600, out_dir: str | None = None, log=None) -> list:
    """Compile every case (see make_case) for its target in one subprocess without TRITON_INTERPRET; returns
    one result dict per case, in order (keys in the module docstring). out_dir: where the .cubin files are
    written (kept); None writes them to a temporary directory that is removed (result['cubin'] = None).
    Raises TimeoutError when the whole batch takes longer than timeout_s."""
    keep = out_dir is not None
    with tempfile.TemporaryDirectory(prefix="cmk_cubin_") as tmp:
        target_dir = os.path.abspath(out_dir) if keep else tmp
        os.makedirs(target_dir, exist_ok=True)
        res = _run_worker("compile", dict(cases=cases, out_dir=target_dir), timeout_s, log)
    if not keep:
        for r in res:
            r["cubin"] = None
    return res


def pruned_configs(kernel: str, N: int, C: int, H: int, W: int, k=None, dtype: str = "bf16",
                   layout: str = "channels_last", act: int = 0, mode=None, cout=None, patch: int = 1,
                   timeout_s: float = 120) -> list:
    """The (GPU) configs the autotuner of `kernel` would try at this problem, after its prune_configs_by:
    [{kwargs, num_warps, num_stages}]; [] for a kernel that is not autotuned. For the GEMM kernels C is
    Cin, cout the output channels (default C), patch the stem's patch size."""
    args = dict(kernel=kernel, N=N, C=C, H=H, W=W, k=k, dtype=dtype, layout=layout, act=act, mode=mode, cout=cout,
                patch=patch)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _run_worker("prune", args, timeout_s)
    return _pruned_configs_here(**args)


def kernel_info(problem: dict | None = None, timeout_s: float = 120) -> dict:
    """{kernel: {module, args, configs}} with the GPU autotune config lists (subprocess if interpreting).
    With problem = dict(N=, C=, H=, W=, k=, dtype=, layout=, ...) (pruned_configs' arguments), each entry
    also has "pruned": the configs its autotuner would try there ([None] for a kernel not autotuned)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _run_worker("info", {"problem": problem}, timeout_s)
    return _kernel_info_here(problem)


def _worker(task: str, src: str, dst: str) -> int:
    _require_compiler()
    with open(src) as f:
        payload = json.load(f)
    if task == "compile":
        results = []
        t0 = time.perf_counter()
        for case in payload["cases"]:
            r = compile_one(case, payload["out_dir"])
            results.append(r)
            print(_fmt(r), file=sys.stderr, flush=True)
        print(f"[aot] {sum(r['ok'] for r in results)}/{len(results)} compiled in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        out = results
    elif task == "prune":
        out = _pruned_configs_here(**payload)
    elif task == "info":
        out = _kernel_info_here(payload.get("problem"))
    else:
        raise SystemExit(f"unknown worker task {task}")
    with open(dst, "w") as f:
        json.dump(out, f, indent=1)
    return 0


def main(argv=None) -> int:
    import argparse
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(*argv[1:4])
    ap = argparse.ArgumentParser(description="AOT-compile one Triton kernel's configs (no GPU needed)")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--target", type=int, default=90)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--layout", default="channels_last")
    ap.add_argument("--out", default=None, help="directory for the .cubin files")
    ap.add_argument("--const", default="", help="extra constexprs, e.g. ACT=1,AFFINE=1")
    args = ap.parse_args(argv)
    const = {}
    for item in filter(None, args.const.split(",")):
        key, _, val = item.partition("=")
        const[key] = int(val) if val.lstrip("-").isdigit() else val
    for key in ("AFFINE", "TRAINING", "STORE_T", "APPLY_BN", "FORM_DT"):
        if key in const:
            const[key] = bool(const[key])
    info = kernel_info()[args.kernel]
    cases = [make_case(args.kernel, args.target, args.dtype, args.layout, args.k, cfg, info["module"], **const)
             for cfg in info["configs"]]
    for r in compile_cases(cases, out_dir=args.out, log=lambda s: None):
        print(_fmt(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
