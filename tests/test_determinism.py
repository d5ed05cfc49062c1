"""Determinism as README "Determinism" states it (issue 11 item 4):
- cpu: bitwise reproducible run to run at a fixed thread count; the depthwise block also across thread
  counts (each channel group's reductions run in one thread, in a fixed order);
- triton: not promised (autotuned tile shapes): under torch.use_deterministic_algorithms(True) an explicit
  backend="triton" raises as PyTorch's nondeterministic ops do (warns with warn_only=True), and "auto" on
  CUDA tensors picks the cuda backend instead; the interpreter (one config per kernel) is reproducible.
"""
import copy

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import backends, dw_block
from numerics import make_block_params, randomize_bn
from test_edge_cases import paper_convmixer


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def train_step(model, x, seed=1):
    """One forward + backward; returns every output, gradient and buffer, as one list."""
    torch.manual_seed(seed)
    m = copy.deepcopy(model).train()
    xi = x.clone().requires_grad_(True)
    out = m(xi)
    out.backward(torch.randn_like(out))
    return [out, xi.grad] + [p.grad for p in m.parameters()] + list(m.buffers())


def fused_model(channels_last=False):
    torch.manual_seed(0)
    m = ck.convert(randomize_bn(paper_convmixer(dim=24, depth=2, k=7)), backend="cpu")
    x = torch.randn(8, 3, 32, 32)  # 16x16 after the stem: 2048 values per channel (the fp32 path)
    return m, x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_bitwise_equal(a, b, what):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"{what}: tensor {i} differs (max {(u.double() - v.double()).abs().max():.3e})"


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_run_to_run(channels_last, threads):
    threads(2)
    m, x = fused_model(channels_last)
    assert_bitwise_equal(train_step(m, x), train_step(m, x), "two runs at 2 threads")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_depthwise_block_across_thread_counts(layout, threads):
    torch.manual_seed(0)
    x = torch.randn(4, 40, 20, 20)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p = make_block_params("dw", 40, 9)

    def run(n):
        threads(n)
        q = {k: (v.clone().requires_grad_(k in ("weight", "bias", "gamma", "beta")) if v is not None else v)
             for k, v in p.items()}
        xi = x.clone().requires_grad_(True)
        y = dw_block(xi, q["weight"], q["bias"], q["gamma"], q["beta"], q["running_mean"], q["running_var"],
                     q["num_batches_tracked"], training=True, backend="cpu")
        torch.manual_seed(2)
        y.backward(torch.randn_like(y))
        return [y, xi.grad] + [q[k].grad for k in ("weight", "bias", "gamma", "beta")] + [q["running_mean"],
                                                                                          q["running_var"]]
    assert_bitwise_equal(run(1), run(2), "1 vs 2 threads")


def test_deterministic_mode_triton_raises_or_warns(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a GPU: the autotuned kernels
    monkeypatch.setattr(backends, "get_backend", lambda name: backends.KernelBackend(name, ("cpu", "cuda"),
                                                                                     *([None] * 6)))
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            backends.resolve("triton", torch.device("cpu"), "dw_block")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            assert backends.resolve("triton", torch.device("cpu"), "dw_block") == "triton"
        torch.use_deterministic_algorithms(False)
        assert backends.resolve("triton", torch.device("cpu"), "dw_block") == "triton"
        for name in ("cpu", "cuda", "cuda_emu"):
            assert backends.nondeterminism(name) is None
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_mode_a_model_call_that_raises_changes_nothing(monkeypatch):
    """The check runs before any running statistic is touched."""
    monkeypatch.setattr(backends, "nondeterminism", lambda name: "test" if name == "cpu" else None)
    m, x = fused_model()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            m(x)
    finally:
        torch.use_deterministic_algorithms(False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_deterministic_mode_cpu_runs():
    m, x = fused_model()
    try:
        torch.use_deterministic_algorithms(True)
        out = m.eval()(x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert out.shape == (8, 10)
