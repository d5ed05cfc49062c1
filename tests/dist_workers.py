"""Rank bodies of the multi-process tests (tests/test_distributed.py). Each runs in its own process,
spawned by `convmixer_kernels.launch.spawn_ranks`: gloo on 127.0.0.1, bounded timeouts, one thread per
rank. A rank that finds a mismatch raises; the parent sees the traceback. Kept free of pytest so the
children import it quickly."""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from convmixer_kernels.launch import free_port, spawn_ranks  # noqa: F401  (the tests import them from here)


# --- models -----------------------------------------------------------------------------------------

DIM, DEPTH, K, P, CLASSES, SIZE = 8, 2, 3, 2, 5, 8


def make_models(kind: str, seed: int = 0):
    """(unfused fp32 model with plain BatchNorm2d, its float64 copy, fused model with the same weights).
    kind: "paper" (converted), "timm" (converted), "ck" (ck.ConvMixer loading timm's weights)."""
    import timm
    import convmixer_kernels as ck
    from convmixer_kernels.reference import ConvMixerPaper
    from numerics import randomize_bn
    torch.manual_seed(seed)
    if kind == "paper":
        unfused = ConvMixerPaper(DIM, DEPTH, K, P, CLASSES, act="gelu")
    else:
        unfused = timm.models.convmixer.ConvMixer(DIM, DEPTH, kernel_size=K, patch_size=P, num_classes=CLASSES,
                                                  act_layer=nn.GELU if kind == "ck" else nn.ReLU)
    randomize_bn(unfused)
    fused = ck.ConvMixer(DIM, DEPTH, K, P, CLASSES, act="gelu") if kind == "ck" else ck.convert(unfused)
    if kind == "ck":
        fused.load_state_dict(unfused.state_dict(), strict=True)
    return unfused, copy.deepcopy(unfused).double(), fused


def global_batch(step: int, n: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def slices(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def assert_rule(name, fused, same, ref64, dtype=torch.float32):
    from convmixer_kernels.numerics import rule
    c = rule(name, fused, same, ref64, dtype)
    assert c.ok, str(c)


def compare_models(where, fused, unfused, ref64):
    for (n, p64), pa, pb in zip(ref64.named_parameters(), unfused.parameters(), fused.parameters()):
        assert_rule(f"{where} param {n}", pb.detach(), pa.detach(), p64.detach())
    for (n, b64), ba, bb in zip(ref64.named_buffers(), unfused.buffers(), fused.buffers()):
        if b64.is_floating_point():
            assert_rule(f"{where} buffer {n}", bb, ba, b64)
        else:
            assert torch.equal(bb, ba), f"{where} buffer {n}: {bb} != {ba}"


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# --- rank bodies ------------------------------------------------------------------------------------

def ddp_matches_unfused_ddp(rank, world, kind, steps):
    """No sync BN: fused and unfused models, both under DDP on the same local slices, stay together
    (each judged against a float64 DDP run by the numerics rule) step by step."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    unfused, ref64, fused = make_models(kind)
    models = [DDP(m) for m in (unfused, ref64, fused)]
    opts = [sgd(m) for m in models]
    sizes = [3] * world
    for step in range(steps):
        x, y = global_batch(step, sum(sizes))
        x, y = x[slices(sizes, rank)], y[slices(sizes, rank)]
        outs = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            out = m(x.double() if m is models[1] else x)
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
            outs.append(out)
        assert_rule(f"rank {rank} step {step} output", outs[2], outs[0], outs[1])
        compare_models(f"rank {rank} step {step}", fused, unfused, ref64)


class CollectiveCounter:
    """Counts the collectives that convmixer_kernels.sync_bn issues (DDP's own are not counted)."""

    def __init__(self):
        from convmixer_kernels import sync_bn
        self.mod, self.calls = sync_bn, {"all_gather": [], "all_reduce": []}
        self.orig = {k: getattr(sync_bn.dist, k) for k in self.calls}

    def __enter__(self):
        mod = self.mod

        class _Dist:
            def __getattr__(_, k):
                return getattr(dist, k)

        spy = _Dist()
        for k in self.calls:
            def wrapped(*a, _k=k, **kw):
                t = a[1] if _k == "all_gather" else a[0]
                self.calls[_k].append(t.numel() * t.element_size())
                return self.orig[_k](*a, **kw)
            setattr(spy, k, wrapped)
        mod.dist = spy
        return self

    def __exit__(self, *exc):
        self.mod.dist = dist


def sync_bn_matches_one_process(rank, world, kind, sizes, steps, how, use_ddp=True):
    """Sync BN on local slices (sizes[r] images on rank r) under DDP matches ONE process training the
    unfused model on the concatenated global batch: outputs, every parameter, running_mean/var and
    num_batches_tracked after each SGD step (numerics rule against the float64 single-process run).
    how: "convert" (ck.convert(sync_bn=True)), "ctor" (ck.ConvMixer(sync_bn=True)), "torch"
    (nn.SyncBatchNorm.convert_sync_batchnorm on the unfused model, then ck.convert), "torch_after"
    (convert_sync_batchnorm on the fused model: nn.SyncBatchNorm children, which DDP refuses on CPU, so
    that variant runs without DDP)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    import convmixer_kernels as ck
    unfused, ref64, fused = make_models(kind)
    if how == "convert":
        fused = ck.convert(unfused, sync_bn=True)
    elif how == "ctor":
        synced = ck.ConvMixer(DIM, DEPTH, K, P, CLASSES, act="gelu", sync_bn=True)
        synced.load_state_dict(fused.state_dict(), strict=True)
        fused = synced
    elif how == "torch":
        fused = ck.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(unfused)))
    elif how == "torch_after":
        fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert list(fused.state_dict()) == list(unfused.state_dict())
    n_bn = sum(isinstance(m, (ck.sync_bn.SyncBatchNorm2d, nn.SyncBatchNorm)) for m in fused.modules())
    assert n_bn == 1 + 2 * DEPTH, f"{n_bn} synchronized BN layers, expected {1 + 2 * DEPTH}"
    model = DDP(fused) if use_ddp else fused
    opts = [sgd(model), sgd(unfused), sgd(ref64)]
    B = sum(sizes)
    for step in range(steps):
        x, y = global_batch(step, B)
        mine = slices(sizes, rank)
        with CollectiveCounter() as cc:
            out = model(x[mine])
            # DDP averages the ranks' gradients: scale each rank's sum so the average is the global mean
            loss = nn.functional.cross_entropy(out, y[mine], reduction="sum") * (world / B)
            opts[0].zero_grad()
            loss.backward()
        if not use_ddp:  # what DDP would have done
            for p in fused.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
        opts[0].step()
        # one all_gather per BN layer in the forward, one all_reduce per BN layer in the backward
        assert len(cc.calls["all_gather"]) == n_bn, cc.calls
        assert len(cc.calls["all_reduce"]) == n_bn, cc.calls
        outs = []
        for m, opt, xx in ((unfused, opts[1], x), (ref64, opts[2], x.double())):
            opt.zero_grad()
            o = m(xx)
            nn.functional.cross_entropy(o, y).backward()
            opt.step()
            outs.append(o)
        if sizes[rank]:
            assert_rule(f"rank {rank} step {step} output", out, outs[0][mine], outs[1][mine])
        else:
            assert out.shape == (0, CLASSES)
        compare_models(f"rank {rank} step {step}", fused, unfused, ref64)
    if rank == 0 and os.environ.get("CMK_REPORT_COLLECTIVES"):
        print(f"sync BN collectives per step: {len(cc.calls['all_gather'])} all_gather "
              f"({sum(cc.calls['all_gather'])} B sent per rank), {len(cc.calls['all_reduce'])} all_reduce "
              f"({sum(cc.calls['all_reduce'])} B)")

