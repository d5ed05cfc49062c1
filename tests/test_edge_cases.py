"""PyTorch's behaviour at the edges (issue 11 item 3): each case matches nn.Conv2d + nn.BatchNorm2d (the
unfused model) or raises a clear error, and a call that raised changes nothing in the caller's model.

Cases: an empty batch; non-contiguous inputs (sliced and permuted views); inference_mode / no_grad and
inputs or parameters without requires_grad; a converted model moved with .to(dtype) / .half() /
.bfloat16(); two Python threads on one eval model; a CPU tensor of more than 2^31 elements.
"""
import copy
import threading

import pytest
import torch
import torch.nn as nn

import convmixer_kernels as ck
from convmixer_kernels import conv_act_bn, dw_block
from convmixer_kernels.reference import ConvMixerPaper, dw_block_reference
from numerics import check_rule, make_block_params, randomize_bn, run_block


def paper_convmixer(dim=16, depth=2, k=5, p=2, n_classes=10):
    """The paper's ConvMixer (the unfused model users have), small."""
    return ConvMixerPaper(dim, depth, kernel_size=k, patch_size=p, n_classes=n_classes)


def models(seed=0):
    torch.manual_seed(seed)
    ref = randomize_bn(paper_convmixer())
    return ref, ck.convert(copy.deepcopy(ref), backend="cpu")


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# --- empty batch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch_blocks(training, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(0, 6, 5, 5).contiguous(memory_format=fmt).requires_grad_(True)
    for kind in ("dw", "pw", "stem"):
        patch = 2 if kind == "stem" else 1
        p = make_block_params(kind, 6, 3, cin=6, patch=patch)
        rm, rv = p["running_mean"].clone(), p["running_var"].clone()
        fn = dw_block if kind == "dw" else conv_act_bn
        kw = {} if kind == "dw" else {"patch": patch}
        y = fn(x, p["weight"].requires_grad_(True), p["bias"], p["gamma"], p["beta"], p["running_mean"],
               p["running_var"], p["num_batches_tracked"], training=training, backend="cpu", **kw)
        # What the unfused layers give.
        conv = (nn.Conv2d(6, 6, 3, groups=6, padding="same") if kind == "dw" else nn.Conv2d(6, 6, patch, patch))
        bn = nn.BatchNorm2d(6)
        bn.num_batches_tracked.fill_(3)
        bn.train(training)
        want = bn(conv(x))
        assert y.shape == want.shape and y.dtype == want.dtype  # (no elements: the layout is moot)
        assert p["num_batches_tracked"].item() == bn.num_batches_tracked.item() == (4 if training else 3)
        assert torch.equal(p["running_mean"], rm) and torch.equal(p["running_var"], rv)
        y.sum().backward()  # the graph still reaches the parameters, with zero gradients as PyTorch's
        assert p["weight"].grad is not None and not p["weight"].grad.any()


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_model(training):
    ref, fused = models()
    ref.train(training)
    fused.train(training)
    x = torch.randn(0, 3, 16, 16)
    out_ref, out = ref(x), fused(x)
    assert out.shape == out_ref.shape == (0, 10)
    bf, br = bn_buffers(fused), bn_buffers(ref)
    assert bf.keys() == br.keys()
    for k in bf:
        assert torch.equal(bf[k], br[k]), k


def test_empty_input_to_op_is_a_clear_error():
    with pytest.raises(ValueError, match="empty input of shape"):
        torch.ops.convmixer.dw_block_forward(torch.randn(0, 4, 5, 5), torch.empty(0), torch.empty(0), torch.empty(0),
                                             torch.randn(4, 1, 3, 3), torch.randn(4), torch.ones(4), torch.zeros(4),
                                             torch.empty(0), torch.empty(0), True, 1e-5, "gelu", "cpu")


# --- non-contiguous inputs --------------------------------------------------------------------------

@pytest.mark.parametrize("view", ["sliced", "permuted"])
@pytest.mark.parametrize("kind", ["dw", "pw", "stem"])
@pytest.mark.parametrize("training", [True, False])
def test_non_dense_views(view, kind, training):
    patch = 2 if kind == "stem" else 1
    x = torch.randn(2, 5 if kind != "stem" else 3, 9, 8)
    p = make_block_params(kind, 5, 3, cin=x.shape[1], patch=patch)
    run_block(kind, x, p, training, "gelu", patch=patch, backend="cpu", view=view)


def test_non_dense_view_model_matches():
    ref, fused = models()
    ref.eval()
    fused.eval()
    x = torch.randn(2, 16, 16, 3).permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: not dense in NCHW
    x = x[:, :, :, :15]                                  # and a slice: dense in neither layout
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        check_rule("logits", fused(x), ref(x), copy.deepcopy(ref).double()(x.double()), torch.float32)


# --- grad modes and requires_grad mixes --------------------------------------------------------------

def test_inference_mode_and_no_grad():
    ref, fused = models()
    x = torch.randn(4, 3, 16, 16)
    for mode in (torch.inference_mode, torch.no_grad):
        for training in (False, True):
            r, f = copy.deepcopy(ref).train(training), copy.deepcopy(fused).train(training)
            with mode():
                out_r, out_f = r(x), f(x)
            assert not out_f.requires_grad
            check_rule(f"{mode.__name__} training={training}", out_f, out_r,
                       copy.deepcopy(ref).double().train(training)(x.double()), torch.float32)
            # no_grad / inference_mode do not stop BatchNorm from updating its statistics in training
            for (k, a), b in zip(bn_buffers(f).items(), bn_buffers(r).values()):
                assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("which", ["input_only", "params_only", "none"])
def test_requires_grad_mixes(which):
    ref, fused = models()
    x = torch.randn(4, 3, 16, 16)
    for m in (ref, fused):
        m.requires_grad_(which == "params_only")
    xr, xf = (x.clone().requires_grad_(which == "input_only") for _ in range(2))
    out_r, out_f = ref(xr), fused(xf)
    assert out_f.requires_grad == out_r.requires_grad
    if which == "none":
        return
    out_r.square().sum().backward()
    out_f.square().sum().backward()
    if which == "input_only":
        assert all(p.grad is None for p in fused.parameters())
        assert torch.allclose(xf.grad, xr.grad, rtol=1e-3, atol=1e-5)
    else:
        assert xf.grad is None
        for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
            assert torch.allclose(pf.grad, pr.grad, rtol=1e-3, atol=1e-5), name


# --- dtype moves ------------------------------------------------------------------------------------

@pytest.mark.parametrize("move", ["to_bf16", "bfloat16", "half", "to_float64"])
def test_model_dtype_moves(move):
    ref, fused = models()
    dtype = {"to_bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "half": torch.float16,
             "to_float64": torch.float64}[move]
    mover = {"to_bf16": lambda m: m.to(torch.bfloat16), "bfloat16": lambda m: m.bfloat16(),
             "half": lambda m: m.half(), "to_float64": lambda m: m.to(torch.float64)}[move]
    ref64 = copy.deepcopy(ref).double().eval()
    ref, fused = mover(ref).eval(), mover(fused).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = fused(x.to(dtype))
        assert out.dtype == dtype
        check_rule(f"logits after {move}", out, ref(x.to(dtype)), ref64(x.double()), dtype)


# --- threads ----------------------------------------------------------------------------------------

def test_two_threads_on_one_eval_model():
    _, fused = models()
    fused.eval()
    xs = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    with torch.no_grad():
        serial = [fused(x) for x in xs]
    results, errors = [None, None], []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(5):
                    out = fused(xs[i])
                    if results[i] is not None and not torch.equal(out, results[i]):
                        raise AssertionError(f"thread {i}: result changed between calls")
                    results[i] = out
        except Exception as e:  # reported below: an exception in a thread would otherwise be lost
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    for i in range(2):
        assert torch.equal(results[i], serial[i])


# --- more than 2^31 elements ------------------------------------------------------------------------

@pytest.mark.slow
def test_more_than_2_31_elements_bf16_eval_k3():
    """bf16 eval depthwise block, k=3, on a (2, 64, 4500, 4500) input: 2.6e9 elements (5.2 GB in, 5.2 GB
    out). Eval planes are independent, so the reference runs on planes that start past 2^31 (and on the
    first one) instead of on the whole tensor."""
    N, C, H, W = 2, 64, 4500, 4500
    assert N * C * H * W > 2**31
    torch.manual_seed(0)
    x = torch.empty(N, C, H, W, dtype=torch.bfloat16)
    x.view(-1)[:: 4099] = 1  # cheap non-trivial content: random planes are filled below
    p = make_block_params("dw", C, 3, dtype=torch.bfloat16)
    planes = [(0, 0), (N - 1, C - 1), (N - 1, 50)]
    for n, c in planes:
        x[n, c] = torch.randn(H, W).to(torch.bfloat16)
    args = (p["weight"], p["bias"], p["gamma"], p["beta"], p["running_mean"], p["running_var"],
            p["num_batches_tracked"])
    y = dw_block(x, *args, training=False, backend="cpu")
    for n, c in planes:
        assert (n * C + c) * H * W > 2**31 or (n, c) == (0, 0)
        xs = x[n:n + 1, c:c + 1]
        ps = [a[c:c + 1] if a is not None and a.dim() else a for a in args]
        same = dw_block_reference(xs, *ps, training=False, act="gelu")
        ps64 = [a.double() if a is not None and a.is_floating_point() else a for a in ps]
        ref64 = dw_block_reference(xs.double(), *ps64, training=False, act="gelu")
        check_rule(f"plane {(n, c)}", y[n:n + 1, c:c + 1], same, ref64, torch.bfloat16)
