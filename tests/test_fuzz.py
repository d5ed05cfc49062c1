"""Property-based fuzz of every fused block against the float64 reference (DESIGN.md section 4 rule on
the output, every gradient and the running statistics), with everything drawn at random: block type
(depthwise, pointwise, stem, and the cross-layer pointwise -> depthwise pair), C, k (even and larger
than the image included), N/H/W, dtype, layout (NCHW, channels_last, sliced and permuted views),
activation, train/eval, momentum (None included), affine and track_running_stats, the input's scale and
offset (|mean| >> std included), the BN parameters and the running statistics.

Profiles (environment variable CMK_FUZZ_PROFILE):
  ci (default)  a fixed seed, a bounded example count, no example database, and no constants drawn from
                other loaded modules: CI runs the same cases every time, whichever tests run beside it
                (about 20 s on the CPU backend, 50 s on the emulated ones, 2-core CI machine).
  local         many more examples, a random seed, and hypothesis's example database kept outside the
                repository (~/.cache/convmixer_kernels/hypothesis) so a failure replays first next time.
The Triton interpreter and the CUDA emulator run the same properties on tiny shapes with fewer examples.

Every counterexample hypothesis has shrunk is kept in REGRESSIONS and runs as an explicit test.
"""
import os

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from convmixer_kernels import backends
from convmixer_kernels.numerics import compare_block, compare_cross_layer, make_block_params

PROFILE = os.environ.get("CMK_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "local"):
    raise ValueError(f"CMK_FUZZ_PROFILE={PROFILE!r}: expected 'ci' or 'local'")
# (examples on the CPU backend, examples on each emulated GPU backend)
EXAMPLES = {"ci": (1000, 8), "local": (20000, 300)}[PROFILE]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


CI_SEED = 20261203  # explicit: derandomize=True would derive the seed from the test's file path


def _draw_no_local_constants():
    """Hypothesis (here 6.170, requirements.txt) draws ~5% of its values from the literals of every local
    module in sys.modules (code outside site-packages). The pool, and so the cases a fixed seed draws, then
    depends on which test files pytest collected: the whole suite's run and `pytest tests/test_fuzz.py`
    drew different cases from the same seed (seen 2026-12-07: the same count of residual cases, with
    different failing checks), so a CI failure did not reproduce from this file alone. The ci profile
    empties that pool (hypothesis's own constants stay), through the internal that holds it; if a
    hypothesis release renames it, this says so instead of silently drawing differently."""
    from hypothesis.internal.conjecture import providers
    if not (hasattr(providers, "_get_local_constants") and hasattr(providers, "Constants")
            and hasattr(providers, "CONSTANTS_CACHE")):
        raise ImportError(f"hypothesis {hypothesis.__version__}: no providers._get_local_constants; update "
                          f"tests/test_fuzz.py's ci profile for this release (requirements.txt pins 6.170.17)")
    providers._get_local_constants = providers.Constants
    providers.CONSTANTS_CACHE.cache.clear()


if PROFILE == "ci":
    _draw_no_local_constants()


def fuzz_settings(max_examples):
    """The profile's settings, and (ci) the fixed seed, as one decorator."""
    db = None if PROFILE == "ci" else DirectoryBasedExampleDatabase(
        os.path.expanduser("~/.cache/convmixer_kernels/hypothesis"))
    s = settings(max_examples=max_examples, deadline=None, database=db,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture],
                 print_blob=False)

    def decorate(test):
        return seed(CI_SEED)(s(test)) if PROFILE == "ci" else s(test)
    return decorate


@st.composite
def cases(draw, tiny=False, dtypes=("float32", "bfloat16", "float64")):
    """One fuzz case as a plain dict (printable, and pasteable into REGRESSIONS)."""
    kind = draw(st.sampled_from(["dw", "pw", "stem", "cross"]))
    training = draw(st.booleans())
    track = draw(st.booleans())
    side = 6 if tiny else 20
    N, H, W = (draw(st.integers(1, 3 if tiny else 20)), draw(st.integers(1, side)), draw(st.integers(1, side)))
    patch = draw(st.integers(1, min(H, W, 5))) if kind == "stem" else 1
    Ho, Wo = H // patch, W // patch
    if (training or not track) and N * Ho * Wo == 1:
        N = 2  # batch statistics need more than one value per channel
    # Channels bounded so the float64 reference of one example stays well under a second.
    budget = 4_000 if tiny else 120_000
    max_c = max(1, min(8 if tiny else 100, budget // (N * H * W)))
    C = draw(st.integers(1, max_c))
    cin = 3 if kind == "stem" else (draw(st.integers(1, max_c)) if kind in ("pw", "cross") else C)
    k = draw(st.integers(1, 11)) if kind in ("dw", "cross") else patch
    dtype = draw(st.sampled_from(dtypes))
    # float64: PyTorch's result is the reference itself, so the rule has no PyTorch error to scale with
    # (atol alone, relative to the values): drawn on well-conditioned data only (no offset, unit scales).
    wide = dtype != "float64"
    return dict(
        kind=kind, N=N, C=C, cin=cin, H=H, W=W, k=k, patch=patch, training=training, track=track,
        dtype=dtype,
        layout=draw(st.sampled_from(["nchw", "channels_last", "sliced", "permuted"])),
        act=draw(st.sampled_from(["gelu", "gelu_tanh", "relu"])),
        momentum=draw(st.sampled_from([0.1, None, 0.9])),
        affine=draw(st.booleans()),
        x_offset=draw(st.sampled_from([0.0, 1.0, -4.0, 30.0] if wide else [0.0])),
        x_scale=draw(st.sampled_from([1.0, 0.1, 10.0] if wide else [1.0])),
        gamma_scale=draw(st.sampled_from([1.0, 0.01, 10.0] if wide else [1.0])),
        var_scale=draw(st.sampled_from([1.0, 1e-3, 100.0])),
        steps=draw(st.sampled_from([1, 2])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _params(kind, C, k, cin, patch, dtype, case):
    p = make_block_params(kind, C, k, cin=cin, patch=patch, dtype=dtype, affine=case["affine"], track=case["track"])
    with torch.no_grad():
        if p["gamma"] is not None:
            p["gamma"].mul_(case["gamma_scale"])
        if p["running_var"] is not None:
            p["running_var"].mul_(case["var_scale"])
            p["running_mean"].add_(case["x_offset"])
    return p


def case_checks(case, backend="cpu"):
    """Every check of one case (numerics.Check: name, fused_err, torch_err, bound, ok)."""
    torch.manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    kind, layout = case["kind"], case["layout"]
    x = case["x_offset"] + case["x_scale"] * torch.randn(case["N"], case["cin"], case["H"], case["W"])
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    view = layout if layout in ("sliced", "permuted") else None
    common = dict(training=case["training"], act=case["act"], momentum=case["momentum"], steps=case["steps"],
                  backend=backend, view=view)
    if kind == "cross":
        p_pw = _params("pw", case["C"], 1, case["cin"], 1, dtype, case)
        p_dw = _params("dw", case["C"], case["k"], None, 1, dtype, case)
        return compare_cross_layer(x, p_pw, p_dw, **common)
    p = _params(kind, case["C"], case["k"], case["cin"], case["patch"], dtype, case)
    return compare_block(kind, x, p, patch=case["patch"], **common)


def case_failures(case, backend="cpu"):
    """The failing checks of one case."""
    return [c for c in case_checks(case, backend) if not c.ok]


def run_case(case, backend="cpu"):
    """All the checks of one case; fails with the case and every failing check."""
    failures = case_failures(case, backend)
    assert not failures, f"{case}\n" + "\n".join(map(str, failures))


# Fuzz failures are judged by the rule over seeds, never by a wider tolerance. In fp32/bf16 some cases
# are ill-conditioned: both results are rounding noise of the same size, and their ratio lands above 2
# now and then. Per-channel reductions over N*H*W (dweight = sum dt*x, dbias, dgamma) whose summands
# cancel (x or t with |mean| >> std), BN training above 512 values per channel (below that the CPU
# training passes run in double, csrc/cpu/cpu_common.h use_exact_training), outputs scaled by a large BN
# factor gamma*rstd (gamma 10, running_var 1e-3: x300), bf16 g rounded by ~5% of the normalized value
# when |mean|/std ~ 10, and ReLU's kink (an exact t within fp32 rounding of 0 takes either sign, and
# act'(t) flips for that element: seen 1e5x PyTorch's dx error on one seed, the other seeds passing).
# A case with ~15 checks then fails the 2x rule by chance (seen: 10 of 12 seeds of one bf16
# configuration fail somewhere while the median error over them is 1.7x PyTorch's). Such a case is judged
# by the rule over NOISE_SEEDS seeds of its configuration: every check must pass it on at least half of
# them (the per-seed ratio's median within the rule). A kernel that is systematically worse fails it.
#
# That is how a real loss was found (2026-12-07): a channels_last stem's dweight summed its N*H*W terms in
# one run inside MKL's narrow GEMM while PyTorch's splits them, 3x PyTorch's error at 280 terms and 8x at
# 8000 on every seed; conv_act_bn.cpp's weight_grad_cl now sums in chunks. Until then this test also
# admitted any case within 8x of PyTorch's error, and any ReLU gradient failure; both shortcuts are gone.
#
# The cross-layer pair (pointwise block with its BN apply deferred into the next depthwise block's load)
# was a class of its own until the input affine kept BatchNorm's centre: u = scale*(g - mean) + beta, with
# d(scale) = sum du*(g - mean) formed in the kernel. Folded into u = scale*g + (beta - mean*scale), the
# output and the statistics' gradient cancelled when |mean| >> std (up to ~3e4x PyTorch's error).
NOISE_SEEDS = 8
RESIDUAL = []


# Until 2026-12-07 the CUDA backend (here its emulator) was a class of its own: its kernels accumulated in
# fp32 only, so with batch statistics over at most 512 values per channel its gradients could be the
# rounding noise issue 11 describes (35 of 300 local-profile cases). It now runs those calls through its
# fp64 kernels and rounds once, as the CPU and Triton backends do, and is judged like them.


def in_residual_class(case, failures, backend="cpu"):
    """Whether a failing case is admitted: (fp32/bf16) a case that holds the rule over NOISE_SEEDS seeds of
    its configuration (median_rule_holds)."""
    return case["dtype"] != "float64" and median_rule_holds(case, backend)


def median_rule_holds(case, backend="cpu"):
    """Every check passes the DESIGN.md rule on at least half of NOISE_SEEDS seeds of the case's
    configuration (its own seed first), and no error is NaN or inf."""
    passed, total = {}, {}
    for i in range(NOISE_SEEDS):
        for c in case_checks(dict(case, seed=case["seed"] + 7919 * i), backend):
            if not (c.fused_err == c.fused_err and c.fused_err != float("inf")):
                return False  # a NaN or inf error is never noise
            passed[c.name] = passed.get(c.name, 0) + c.ok
            total[c.name] = total.get(c.name, 0) + 1
    return all(2 * passed[n] >= total[n] for n in total)


# Shrunk counterexamples found by the fuzz (each once failed; kept so they keep passing).
REGRESSIONS = [
    # CI, stop 24: PyTorch's own bf16 stem conv (the rule's yardstick) returned NaN for cin=3, k=s=2, Wo=1;
    # the reference stem now goes through reference.patch_conv.
    {'kind': 'stem', 'N': 17, 'C': 48, 'cin': 3, 'H': 16, 'W': 3, 'k': 2, 'patch': 2, 'training': True,
     'track': True, 'dtype': 'bfloat16', 'layout': 'channels_last', 'act': 'gelu', 'momentum': None,
     'affine': True, 'x_offset': 0.0, 'x_scale': 0.1, 'gamma_scale': 1.0, 'var_scale': 0.001, 'steps': 2,
     'seed': 591},
]


@pytest.mark.parametrize("case", REGRESSIONS, ids=lambda c: f"{c['kind']}-{c['dtype']}-{c['layout']}-s{c['seed']}")
def test_fuzz_regression(case):
    run_case(case)


# The channels_last stem dweight loss (issue 11): a fp32 eval stem whose weight gradient sums N*H*W = 280
# and 8000 terms. PyTorch's yardstick splits that sum across threads, so the loss shows only with >= 2
# threads (at 1 both summed in one run); before weight_grad_cl each seed below failed at 3-8x.
STEM_DWEIGHT = {'kind': 'stem', 'N': 7, 'C': 21, 'cin': 3, 'H': 4, 'W': 10, 'k': 1, 'patch': 1, 'training': False,
                'track': True, 'dtype': 'float32', 'layout': 'channels_last', 'act': 'gelu', 'momentum': 0.1,
                'affine': False, 'x_offset': 0.0, 'x_scale': 1.0, 'gamma_scale': 1.0, 'var_scale': 0.001,
                'steps': 1, 'seed': 0}


# weight_grad_cl's chunking (csrc/cpu/conv_act_bn.cpp) with rows left over after the equal chunks: narrow
# (cin 5: 7 chunks of 33 rows + 2) and wide (cin 64: 2 chunks of 550 rows + 1), eval and training; a row lost
# or counted twice would be far outside the rule.
@pytest.mark.parametrize("cin,W", [(5, 233), (64, 1101)], ids=["narrow", "wide"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_pointwise_dweight_chunk_remainder(cin, W, training):
    run_case(dict(STEM_DWEIGHT, kind="pw", cin=cin, C=24, N=1, H=1, W=W, training=training, var_scale=1.0))


@pytest.mark.parametrize("shape", [(7, 4, 10), (20, 20, 20)], ids=lambda s: f"NHW{s[0] * s[1] * s[2]}")
def test_stem_dweight_two_threads(shape):
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seed in (0, 7919 * 3):
            run_case(dict(STEM_DWEIGHT, N=shape[0], H=shape[1], W=shape[2], seed=seed))
    finally:
        torch.set_num_threads(old)


@fuzz_settings(EXAMPLES[0])
@given(case=cases())
def test_fuzz_cpu(case):
    failures = case_failures(case)
    if failures and in_residual_class(case, failures):
        RESIDUAL.append((case, failures))
        return
    assert not failures, f"{case}\n" + "\n".join(map(str, failures))


def test_fuzz_cpu_residual_class():
    """Reports (as an expected failure naming the open issue) the fuzz cases of test_fuzz_cpu that failed the
    rule on their own seed and held it over NOISE_SEEDS seeds; runs after it (pytest keeps file order)."""
    if not RESIDUAL:
        pytest.skip("no fuzz case of this run failed on its own seed (or test_fuzz_cpu did not run)")
    import collections

    checks = collections.Counter(c.name.split()[-1] for _, fs in RESIDUAL for c in fs)
    worst = max(c.fused_err / max(c.torch_err, 1e-300) for _, fs in RESIDUAL for c in fs)
    case, failures = RESIDUAL[0]
    pytest.xfail(f"issue 11 (open): of {EXAMPLES[0]} fuzz cases, {len(RESIDUAL)} failed the rule on their own "
                 f"seed and held it on at least half of {NOISE_SEEDS} seeds of their configuration (failing "
                 f"checks: {dict(checks)}; largest ratio to PyTorch's error on the own seed: {worst:.3g}; "
                 f"first: {case}: {failures[0]})")


def _emulated(name):
    available, reason = backends.available_backends()[name]
    if not available:
        pytest.skip(f"{name} backend unavailable: {reason}")


RESIDUAL_EMULATED = []


def run_emulated_case(case, backend):
    failures = case_failures(case, backend)
    if failures and in_residual_class(case, failures, backend):
        RESIDUAL_EMULATED.append((backend, case, failures))
        return
    assert not failures, f"{case}\n" + "\n".join(map(str, failures))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under TRITON_INTERPRET=1 only")
@fuzz_settings(EXAMPLES[1])
@given(case=cases(tiny=True, dtypes=("float32",)))  # the interpreter computes through numpy: no bfloat16
def test_fuzz_triton_interpreter(case):
    _emulated("triton")
    run_emulated_case(case, "triton")


@fuzz_settings(EXAMPLES[1])
@given(case=cases(tiny=True, dtypes=("float32", "bfloat16", "float64")))
def test_fuzz_cuda_emu(case):
    _emulated("cuda_emu")
    run_emulated_case(case, "cuda_emu")


def test_fuzz_emulated_residual_class():
    """Reports the emulated-backend fuzz cases that fell in a residual class (runs after them)."""
    if not RESIDUAL_EMULATED:
        pytest.skip("no emulated-backend fuzz case of this run fell in a residual class (or none ran)")
    backend, case, failures = RESIDUAL_EMULATED[0]
    pytest.xfail(f"issue 11 (open): {len(RESIDUAL_EMULATED)} emulated-backend fuzz case(s) in a residual class "
                 f"(each holds the rule over {NOISE_SEEDS} seeds); first: {backend} {case}: "
                 f"{failures[0]}")
