"""Ahead-of-time compile check of the Triton kernels for real GPUs (sm_90 and sm_80), with no GPU.

The interpreter (TRITON_INTERPRET=1, the CPU path of tests/test_triton.py) never runs Triton's compiler:
layouts, tl.dot lowering to tensor cores, register allocation and ptxas never happen there. This test
runs the real pipeline (AST -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the ptxas in the triton
wheel) through convmixer_kernels/triton/aot.py, which compiles in a subprocess without TRITON_INTERPRET
and reads registers / stack / local memory from each cubin with the wheel's cuobjdump.

What is compiled (plan()):
  hot          the kernels that must not spill, at the ConvMixer hot path: _dw_forward_apply_kernel,
               _dw_forward_stats_kernel, _dw_backward_reduce_kernel, _dw_backward_dt_kernel and
               _dw_backward_dx_kernel at k=7 and k=9, sm_90, bf16, channels_last, every config their
               autotuner keeps at a ConvMixer-768/32 layer (C=768, 32x32); _cab_gemm_kernel's configs
               (sm_90 bf16 channels_last, the statistics epilogue: its heaviest mode).
  coverage     every autotune config of every launched kernel once for sm_90, cycling through the dtypes
               (fp32, fp16, bf16), both layouts, the activations and the kernel's modes (MODE / TRAINING /
               FORM_DT / APPLY_BN / AFFINE), depthwise k=3; the two reduction kernels of common.py with
               their launcher's tile sizes; for every kernel its largest config in bf16 for sm_80 (the
               depthwise ones at k=9). ~105 compiles in all, ~2 minutes on 2 cores (pytest: 123 s).
  full         CMK_AOT_FULL=1: every config x dtype x k x layout for both targets (a machine with time).
Asserted: every case compiles; the GEMMs use tensor cores in 16 bit; the depthwise kernels and
_cab_gemm_kernel need at most SPILL_BOUND_BYTES of stack/local memory in every compiled case (hot
and coverage), the hot apply kernel none (HOT_APPLY_BOUND_BYTES). Other kernels' spills are reported as a warning. `python tests/test_triton_aot.py
[--full]` prints the table.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from convmixer_kernels.triton import aot  # noqa: E402  (pure Python until a compile is asked for)

TARGETS = (90, 80)
DTYPES = ("fp32", "fp16", "bf16")
KS = (3, 7, 9)
LAYOUTS = ("channels_last", "nchw")
DW_KERNELS = ("_dw_forward_apply_kernel", "_dw_forward_stats_kernel", "_dw_backward_reduce_kernel",
              "_dw_backward_dt_kernel", "_dw_backward_dx_kernel")
NO_SPILL_KERNELS = DW_KERNELS + ("_cab_gemm_kernel",)
# Stack + local bytes per thread allowed in NO_SPILL_KERNELS. Not 0: at k <= 9 every kept config of these
# kernels compiles (swept over dtypes x layouts x sm_90/sm_80) to 0 bytes except a few cases at 8-32 bytes,
# all exactly at a ptxas occupancy breakpoint (64/72/80/96/128 registers) where ptxas chooses to spill a
# register or two to fit one more CTA per SM; no kernel design keeps every config off every breakpoint,
# and forcing a register budget (maxnreg) made ptxas fill it and spill anyway. 32 bytes is the largest
# such frame seen; the old design needed 7,320 (apply, k=9) and 264-528 (dt, GEMM 128x256). A real
# regression (a tile-sized array in local memory) is hundreds of bytes or more and fails here.
SPILL_BOUND_BYTES = 32
# The eval apply kernel (the product's hottest kernel) at the hot path (sm_90 bf16 channels_last, k=7/9,
# the configs kept at HOT_PROBLEM) compiles to no stack at all: asserted exactly.
HOT_APPLY_BOUND_BYTES = 0
# The ConvMixer-768/32 layer (224 px input, patch 7): where the hot configs are pruned.
HOT_PROBLEM = dict(N=64, C=768, H=32, W=32, dtype="bf16", layout="channels_last")
FULL = os.environ.get("CMK_AOT_FULL") == "1"
# the whole compile batch (one subprocess); the default plan takes ~2 minutes on 2 cores
TIMEOUT_S = 7200 if FULL else 420


def _config_size(cfg) -> int:
    if cfg is None:
        return 0
    n = 1
    for v in cfg["kwargs"].values():
        n *= v
    return n * 1000 + cfg["num_warps"]


def _variant(name: str, args: set, i: int) -> dict:
    """Constexpr variant i of a kernel: cycles the activation and the kernel's modes."""
    c = {"ACT": i % 3, "TRAINING": i % 2 == 0, "AFFINE": i % 2 == 1, "APPLY_BN": i % 2 == 0}
    if "FORM_DT" in args:  # (FORM_DT, TRAINING): the launcher's three combinations
        c["FORM_DT"], c["TRAINING"] = ((True, True), (False, True), (True, False))[i % 4 % 3]
    if "MODE" in args:
        c["MODE"] = i % 3
        c["STORE_T"] = c["MODE"] != 0 or i % 2 == 1
    if name in ("_cab_gemm_kernel", "_cab_dweight_kernel", "_cab_dinput_kernel"):
        c["P"] = 7 if i % 4 == 3 else 1  # now and then the stem (patch 7, Kd = 3*49)
    return c


def plan(info: dict, info32: dict | None = None, full: bool = FULL) -> list:
    """Cases (aot.make_case dicts, each with an extra "role": hot | coverage) from
    aot.kernel_info(problem=HOT_PROBLEM) and, for kernels whose pruning depends on the dtype (the GEMM:
    16-bit and fp32 config lists), info32 = the same for fp32. A config is only compiled with a dtype its
    autotuner would try it with."""
    cases = []
    info32 = info32 or info

    def allowed(name, dtype):
        pr = (info32 if dtype == "fp32" else info)[name].get("pruned") or [None]
        return info[name]["configs"] if pr == [None] or name in DW_KERNELS else pr

    def add(role, name, target, dtype, layout, k, cfg, **const):
        c = aot.make_case(name, target, dtype, layout, k, cfg, info[name]["module"], **const)
        c["role"] = role
        cases.append(c)

    for name, ki in info.items():
        args = set(ki["args"])
        configs = ki["configs"]
        has_k = "K" in args
        if full:
            for target in TARGETS:
                for i, cfg in enumerate(configs):
                    for dtype in DTYPES:
                        for k in (KS if has_k else (None,)):
                            for layout in LAYOUTS:
                                add("coverage", name, target, dtype, layout, k, cfg, **_variant(name, args, i))
            continue
        if name in DW_KERNELS:
            for k in (7, 9):
                for cfg in ki["pruned"]:
                    add("hot", name, 90, "bf16", "channels_last", k, cfg)
        if name == "_cab_gemm_kernel":  # the statistics epilogue (the heaviest), both config lists
            for dtype in ("bf16", "fp32"):
                for cfg in allowed(name, dtype):
                    add("hot", name, 90, dtype, "channels_last", None, cfg, MODE=1, STORE_T=True)
        has_data = any(a[:-4] in aot.DATA_PTRS for a in ki["args"] if a.endswith("_ptr"))
        for i in range(max(len(configs), 3 if has_data else 1)):  # every config and dtype at least once
            dtype = DTYPES[i % 3]
            cfg = configs[i % len(configs)]
            ok = allowed(name, dtype)
            if cfg not in ok:
                cfg = ok[i % len(ok)]
            add("coverage", name, 90, dtype, LAYOUTS[i % 2], 3 if has_k else None, cfg, **_variant(name, args, i))
        largest = max(allowed(name, "bf16"), key=_config_size)
        add("coverage", name, 80, "bf16", "channels_last", 9 if has_k else None, largest, **_variant(name, args, 0))
    return cases


def main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="AOT-compile the Triton kernels (no GPU needed)")
    ap.add_argument("--full", action="store_true", help="every config x dtype x k x layout x target")
    ap.add_argument("--only", default=None, help="comma list of kernel names")
    ap.add_argument("--out", default=None, help="keep the .cubin files here")
    args = ap.parse_args(argv)
    full = args.full or FULL
    info = aot.kernel_info(problem=HOT_PROBLEM)
    cases = plan(info, aot.kernel_info(problem=dict(HOT_PROBLEM, dtype="fp32")), full)
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c["kernel"] in keep]
    results = aot.compile_cases(cases, timeout_s=7200 if full else TIMEOUT_S, out_dir=args.out,
                                log=lambda s: sys.stderr.write(s))
    bad = [r for r in results if not r["ok"]]
    spills = [r for r in results if r["ok"] and (r.get("stack") or 0) + (r.get("local") or 0) > 0]
    print(f"[aot] {len(results) - len(bad)}/{len(results)} compiled; {len(spills)} with stack/local memory",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# --- pytest side ----------------------------------------------------------------------------------------

import pytest  # noqa: E402

KERNELS = aot.launched_kernels()


def _skip_reason():
    import importlib.util
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "triton is not installed"
    tdir = os.path.dirname(spec.origin)
    if not os.path.isdir(os.path.join(tdir, "backends", "nvidia")):
        return "this triton has no NVIDIA backend (triton/backends/nvidia missing)"
    if not (os.path.exists(os.path.join(tdir, "backends", "nvidia", "bin", "ptxas")) or os.environ.get("TRITON_PTXAS_PATH")):
        return "no ptxas: neither the triton wheel's backends/nvidia/bin/ptxas nor TRITON_PTXAS_PATH"
    return None


@pytest.fixture(scope="module")
def aot_results():
    reason = _skip_reason()
    if reason:
        pytest.skip(f"AOT compile check not possible: {reason}")
    try:
        info = aot.kernel_info(problem=HOT_PROBLEM)
        cases = plan(info, aot.kernel_info(problem=dict(HOT_PROBLEM, dtype="fp32")))
        results = aot.compile_cases(cases, timeout_s=TIMEOUT_S)
    except (TimeoutError, RuntimeError) as e:
        pytest.fail(str(e))
    for c, r in zip(cases, results):
        r["role"] = c["role"]
    return results


def _spill(r) -> int:
    return (r.get("stack") or 0) + (r.get("local") or 0)


def _row(r) -> str:
    return f"{r['case']}: regs={r.get('reg')} stack={r.get('stack')} local={r.get('local')}"


def test_kernel_discovery():
    assert {"_dw_forward_apply_kernel", "_cab_gemm_kernel", "_bn_stats_finalize_kernel"} <= set(KERNELS), KERNELS
    assert set(DW_KERNELS) <= set(KERNELS), KERNELS


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_compiles_for_sm90_and_sm80(aot_results, kernel):
    mine = [r for r in aot_results if r["kernel"] == kernel]
    assert mine, f"{kernel}: no AOT case was planned for this kernel (add it to plan())"
    assert {r["target"] for r in mine} == set(TARGETS), f"{kernel}: targets compiled {sorted({r['target'] for r in mine})}"
    bad = [f"{r['case']}: {r['error']}" for r in mine if not r["ok"]]
    assert not bad, "\n\n".join(bad)


def test_plan_covers_configs_dtypes_and_kernel_sizes(aot_results):
    for kernel in KERNELS:
        if kernel == "_bn_stats_finalize_kernel":
            continue  # fp32 pointers only: nothing dtype-generic
        dtypes = {r["dtype"] for r in aot_results if r["kernel"] == kernel and r["target"] == 90}
        assert dtypes == set(DTYPES), f"{kernel}: dtypes {dtypes}"
    ks = {r["const"]["K"] for r in aot_results if "K" in r["const"]}
    assert {"3", "7", "9"} <= ks, f"depthwise kernel sizes compiled: {ks}"
    for kernel in DW_KERNELS:
        hot = {(r["const"]["K"], str(r["config"])) for r in aot_results if r["kernel"] == kernel and r["role"] == "hot"}
        assert {k for k, _ in hot} == {"7", "9"}, f"{kernel}: hot cases {sorted(hot)}"


@pytest.mark.parametrize("kernel", NO_SPILL_KERNELS)
def test_hot_kernels_do_not_spill(aot_results, kernel):
    """The depthwise kernels (every kept config, k=7/9 at the hot path, k=3/9 in the coverage cases) and
    the pointwise GEMM must compile with at most SPILL_BOUND_BYTES of stack/local memory per thread."""
    mine = [r for r in aot_results if r["kernel"] == kernel and r["ok"]]
    assert mine
    bad = [_row(r) for r in mine if _spill(r) > SPILL_BOUND_BYTES]
    if kernel == "_dw_forward_apply_kernel":
        bad += [_row(r) + " (hot apply: must be 0)" for r in mine
                if r["role"] == "hot" and _spill(r) > HOT_APPLY_BOUND_BYTES]
    assert not bad, (f"{kernel} spills (> {SPILL_BOUND_BYTES} bytes of stack/local memory):\n  " + "\n  ".join(bad))


def test_dot_kernels_use_tensor_cores(aot_results):
    """The GEMM kernels must lower a 16-bit tl.dot to tensor-core instructions (sm_80: mma.sync; sm_90:
    wgmma or mma.sync). fp32 operands use input_precision="ieee": plain FMA, by design (no TF32)."""
    checked = 0
    for r in aot_results:
        if r["ok"] and r["dtype"] != "fp32" and r["kernel"] in ("_cab_gemm_kernel", "_cab_dweight_kernel",
                                                                 "_cab_dinput_kernel"):
            checked += 1
            assert r.get("mma"), f"{r['case']}: no mma/wgmma instruction in the PTX"
    assert checked


def test_report_register_spills(aot_results):
    """Not a failure for the kernels outside NO_SPILL_KERNELS: warns about stack/local memory (spills),
    which the interpreter never shows. The table is in the warning (pytest -rw)."""
    import warnings
    heavy = [_row(r) for r in aot_results if r["ok"] and r["kernel"] not in NO_SPILL_KERNELS and _spill(r) > 0]
    if heavy:
        warnings.warn("Triton kernels with spills / stack frames:\n  " + "\n  ".join(heavy))
