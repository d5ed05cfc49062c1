"""The CUDA kernels judged by their compiled code (no GPU needed): the build's own objects of
csrc/cuda/*.cu (their sm_80 and sm_90 cubins; an nvcc -cubin for sm_90 when the build is older than the
sources) read with the cuobjdump in Triton's wheel: registers, spills and the SASS of the conv's hot loop.

What must hold (issue 10 targets, bf16/fp16/fp32, every activation, both layouts share the code):
  - no kernel of the depthwise or conv-act-BN files has a stack frame or local memory (spills), on any
    target in the file;
  - on sm_90, the tiled depthwise kernel at k = 3, 7, 9 reads every tap from shared memory: its conv loop
    has no global load, and FFMA is at least 60% of the loop's instructions at k = 7, 9 (50% at k = 3);
    the rest is the LDS of the sliding window, the store of t, loop control;
  - at k = 9 the hot loop's static issue count is within 2x of the FMA floor (81 FFMA per output).
Skipped, with the reason, where nvcc or cuobjdump is missing.
"""
from __future__ import annotations

import os
import re
import shutil

import pytest

from convmixer_kernels import sass, static_report

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA's compiler) is not on PATH")

# Bytes of stack/local memory allowed per thread in any kernel: none. Every array the kernels index is
# unrolled into registers (weights, the sliding window) or lives in shared memory.
MAX_STACK_BYTES = 0
MIN_FFMA_FRACTION = 0.60     # the target at k = 7 and 9
MIN_FFMA_FRACTION_K3 = 0.50  # k = 3: 10 LDS per 24 FFMA per row of taps (see the test)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    try:
        sass.tool("cuobjdump")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    cache = os.environ.get("CMK_SASS_CACHE") or str(tmp_path_factory.mktemp("cubin"))
    out = {}
    for src in ("dw_block.cu", "conv_act_bn.cu"):
        # the build's object (sm_80 and sm_90 cubins) when fresh, else an sm_90 nvcc compile
        path = static_report.compile_cuda(os.path.join(static_report.CUDA_DIR, src), 90, cache, log=lambda *a, **k: None)
        usage, code = sass.resource_usage(path, "sm_90"), sass.disassemble(path, "sm_90")
        sass.demangle_all(k[1] for k in code)
        out[src] = (usage, code)
    return out


@pytest.mark.parametrize("src", ("dw_block.cu", "conv_act_bn.cu"))
def test_no_kernel_spills(compiled, src):
    usage, _ = compiled[src]
    assert usage, f"no kernels found in the cubin of {src}"
    bad = [f"{sass.demangle_cached(name)[:120]}: stack {r.stack} B, local {r.local} B, {r.regs} regs"
           for (_, name), r in usage.items() if r.stack > MAX_STACK_BYTES or r.local > MAX_STACK_BYTES]
    assert not bad, "kernels with spills / stack frames:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("k", (3, 7, 9))
@pytest.mark.parametrize("mode", ("kApply", "kStats", "kReduce"))
@pytest.mark.parametrize("dtype", ("__nv_bfloat16", "__half", "float"))
def test_tiled_conv_hot_loop(compiled, k, mode, dtype):
    usage, code = compiled["dw_block.cu"]
    pat = re.compile(rf"dw_conv_tile_kernel<{re.escape(dtype)}, {k}, {static_report.MODES[mode]}>")
    keys = [key for key in code if key[0] == "sm_90" and pat.search(sass.demangle_cached(key[1]))]
    assert len(keys) == 1, f"{pat.pattern}: {len(keys)} kernels"
    mix = sass.loop_with_fma(code[keys[0]], k * k * static_report.ROW_OUT)
    assert mix is not None, (f"no loop does k*k*{static_report.ROW_OUT} FFMA (the conv of one row segment); loops: "
                             + str([(m.fma_work, m.instructions) for m in sass.innermost_fma_loops(code[keys[0]])]))
    assert mix.classes.get("ldg", 0) == 0 and mix.classes.get("local", 0) == 0, mix.opcodes
    # k=3: each row of taps costs kRowOut+2 loads for 3*kRowOut FMAs, so the share tops out near 60%
    assert mix.fma_fraction >= (MIN_FFMA_FRACTION if k >= 7 else MIN_FFMA_FRACTION_K3), (
        f"FFMA is {mix.fma_fraction:.0%} of the hot loop ({mix.instructions} instructions: {mix.opcodes})")
    if k == 9:
        per_output = mix.instructions / static_report.ROW_OUT
        assert per_output <= 2 * k * k, f"{per_output:.1f} instructions per output against 81 FFMA"
