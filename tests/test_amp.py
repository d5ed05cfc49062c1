"""Whole models under torch.autocast, as people train: ck.ConvMixer and the converted paper and timm
models, forward and backward, a GradScaler training loop, and torch.compile(fullgraph=True).

Tolerance: the DESIGN.md section 4 rule applied to the whole model. The fused model under autocast
must be at least as close to a float64 copy of the same model (no autocast) as the unfused model under
the same autocast is, with slack: max|fused - ref64| <= 2 * max|unfused - ref64| + atol, atol the
autocast dtype's (bf16 1e-2, fp16 1e-3). A bf16 model differs from float64 by its rounding (about
2^-8 relative per op, compounded through the layers), so a fixed absolute tolerance would either
miss real bugs or fail on rounding; the unfused model's own error is the yardstick."""
import copy

import pytest
import torch
import torch.nn as nn

import convmixer_kernels as ck
from convmixer_kernels.reference import ConvMixerPaper
from numerics import check_rule, randomize_bn

timm = pytest.importorskip("timm")

DIM, DEPTH, K, P, CLASSES = 16, 2, 5, 2, 7


def _paper():
    return ConvMixerPaper(DIM, DEPTH, K, P, CLASSES, act="gelu")


def _timm():
    return timm.models.convmixer.ConvMixer(DIM, DEPTH, kernel_size=K, patch_size=P, num_classes=CLASSES,
                                           act_layer=nn.ReLU)


def pair(name, cross_layer=True):
    """(unfused model, fused model) with the same parameters and buffers."""
    if name == "ck.ConvMixer":
        unfused = randomize_bn(timm.models.convmixer.ConvMixer(DIM, DEPTH, kernel_size=K, patch_size=P,
                                                                num_classes=CLASSES, act_layer=nn.GELU))
        fused = ck.ConvMixer(DIM, DEPTH, K, P, CLASSES, act="gelu")
        fused.load_state_dict(unfused.state_dict(), strict=True)
        ck.set_cross_layer(fused, cross_layer)
        return unfused, fused
    unfused = randomize_bn(_paper() if name == "paper" else _timm())
    return unfused, ck.convert(unfused, cross_layer=cross_layer)


def devices_and_dtypes():
    out = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]
    for dt in (torch.float16, torch.bfloat16):
        out.append(pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="CUDA autocast needs a CUDA device")))
    return out


def make_input(kind, device, dtype, n=4, size=10):
    x = torch.randn(n, 3, size, size, device=device)
    if kind == "autocast_dtype":
        x = x.to(dtype)
    elif kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def run(model, x, device, dtype):
    with torch.autocast(device, dtype=dtype):
        y = model(x)
    return y


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("name", ("ck.ConvMixer", "paper", "timm"))
@pytest.mark.parametrize("cross_layer", (True, False), ids=("cross", "nocross"))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("inp", ("fp32", "autocast_dtype", "channels_last"))
def test_model_forward_backward_under_autocast(device, dtype, name, cross_layer, training, inp):
    unfused, fused = pair(name, cross_layer)
    ref64 = copy.deepcopy(unfused).double()
    models = [m.to(device).train(training) for m in (unfused, fused)]
    ref64.train(training)
    x = make_input(inp, device, dtype)
    ys = [run(m, x, device, dtype) for m in models]
    y64 = ref64(x.detach().cpu().double())
    assert ys[0].dtype == ys[1].dtype, "fused output dtype differs from the unfused model's under autocast"
    check_rule("output", ys[1].cpu(), ys[0].cpu(), y64, dtype)
    # the loss is formed in fp32 from the autocast output, as a training script does
    for y in ys:
        y.float().square().mean().backward()
    y64.square().mean().backward()
    for (n, p64), pa, pb in zip(ref64.named_parameters(), models[0].parameters(), models[1].parameters()):
        assert pb.grad is not None and pb.grad.dtype == pa.grad.dtype == torch.float32, n
        check_rule(f"grad {n}", pb.grad.cpu(), pa.grad.cpu(), p64.grad, dtype)
    for (n, b64), ba, bb in zip(ref64.named_buffers(), models[0].buffers(), models[1].buffers()):
        assert bb.dtype == ba.dtype, n  # running stats stay fp32
        if b64.is_floating_point():
            check_rule(f"buffer {n}", bb.cpu(), ba.cpu(), b64, dtype)
        else:
            assert torch.equal(bb.cpu(), ba.cpu()), n


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("name", ("ck.ConvMixer", "paper", "timm"))
def test_gradscaler_training_loop_tracks_unfused(device, dtype, name):
    """Several AMP steps with torch.amp.GradScaler and SGD: the fused model's losses, parameters and
    running statistics stay as close to a float64 run of the same steps as the unfused AMP run does."""
    unfused, fused = pair(name)
    ref64 = copy.deepcopy(unfused).double()
    runs = [(m.to(device).train(), torch.amp.GradScaler(device, init_scale=2.0 ** 10)) for m in (unfused, fused)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m, _ in runs]
    opt64 = torch.optim.SGD(ref64.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(6, 3, 10, 10, generator=g)
        target = torch.randint(0, CLASSES, (6,), generator=g)
        losses = []
        for (m, scaler), opt in zip(runs, opts):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype):
                out = m(x.to(device))
            loss = nn.functional.cross_entropy(out.float(), target.to(device))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach().cpu())
        opt64.zero_grad(set_to_none=True)
        loss64 = nn.functional.cross_entropy(ref64(x.double()), target)
        loss64.backward()
        opt64.step()
        check_rule(f"step {step} loss", losses[1], losses[0], loss64, dtype)
        assert runs[0][1].get_scale() == runs[1][1].get_scale(), "the scaler skipped a step in one run only"
    for (n, p64), pa, pb in zip(ref64.named_parameters(), runs[0][0].parameters(), runs[1][0].parameters()):
        check_rule(f"param {n}", pb.detach().cpu(), pa.detach().cpu(), p64.detach(), dtype)
    for (n, b64), ba, bb in zip(ref64.named_buffers(), runs[0][0].buffers(), runs[1][0].buffers()):
        if b64.is_floating_point():
            check_rule(f"buffer {n}", bb.cpu(), ba.cpu(), b64, dtype)
        else:
            assert torch.equal(bb.cpu(), ba.cpu()), n


@pytest.mark.slow
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_compile_fullgraph_under_autocast(training):
    torch._dynamo.reset()
    unfused, fused = pair("ck.ConvMixer")
    ref64 = copy.deepcopy(unfused).double().train(training)
    unfused.train(training)
    compiled_model = copy.deepcopy(fused).train(training)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_unfused = unfused(x)
        y_comp = compiled(x)
    y64 = ref64(x.double())
    assert y_comp.dtype == y_unfused.dtype
    check_rule("output", y_comp, y_unfused, y64, torch.bfloat16)
    if training:
        y_comp.float().square().mean().backward()
        y_unfused.float().square().mean().backward()
        y64.square().mean().backward()
        for (n, p64), pa, pb in zip(ref64.named_parameters(), unfused.parameters(), compiled_model.parameters()):
            check_rule(f"grad {n}", pb.grad, pa.grad, p64.grad, torch.bfloat16)
