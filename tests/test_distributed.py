"""torch.distributed, as ConvMixer users train: fused models under DistributedDataParallel, and the fused
synchronized BatchNorm (sync_bn.py) against ONE process on the concatenated global batch (PyTorch's own
SyncBatchNorm test pattern). Ranks are spawned processes on this machine: gloo on 127.0.0.1, bounded
timeouts, and no process left behind (dist_workers.spawn_ranks)."""
import pytest
import torch
import torch.distributed as dist

import convmixer_kernels as ck
from dist_workers import (CLASSES, DEPTH, DIM, K, P, ddp_matches_unfused_ddp, make_models,
                          spawn_ranks, sync_bn_matches_one_process)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.parametrize("kind", ("paper", "ck"))
def test_ddp_fused_matches_unfused_ddp(kind):
    spawn_ranks(ddp_matches_unfused_ddp, 2, kind, 3)


@pytest.mark.parametrize("how", ("convert", "ctor", "torch", "torch_after"))
def test_sync_bn_two_ranks_match_one_process(how):
    spawn_ranks(sync_bn_matches_one_process, 2, "ck" if how == "ctor" else "timm", [3, 3], 3, how,
                how != "torch_after")


def test_sync_bn_three_ranks_unequal_slices_match_one_process():
    spawn_ranks(sync_bn_matches_one_process, 3, "paper", [1, 4, 2], 3, "convert")


def test_sync_bn_rank_with_empty_slice_joins_the_collectives():
    spawn_ranks(sync_bn_matches_one_process, 3, "paper", [3, 0, 2], 2, "convert", False)


def test_sync_bn_world_size_one_matches_one_process():
    spawn_ranks(sync_bn_matches_one_process, 1, "paper", [4], 2, "convert")


def test_sync_bn_without_process_group_is_a_clear_error_and_eval_needs_none():
    assert not dist.is_initialized()
    unfused, _, _ = make_models("paper")
    fused = ck.convert(unfused, sync_bn=True)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="sync_bn needs an initialized torch.distributed process group"):
        fused(x)
    # eval issues no collective (none could run here), and matches the unfused model
    fused.eval()
    unfused.eval()
    assert (fused(x) - unfused(x)).abs().max().item() < 1e-4
    # a synchronized BN is not silently run unsynchronized outside its fused module
    with pytest.raises(RuntimeError, match="is run by that module"):
        fused[2].train()(torch.randn(2, DIM, 4, 4))


def test_sync_bn_state_dict_keys_unchanged():
    unfused, _, fused = make_models("timm")
    synced = ck.convert(unfused, sync_bn=True)
    assert list(synced.state_dict()) == list(unfused.state_dict())
    fresh = ck.ConvMixer(DIM, DEPTH, K, P, CLASSES, sync_bn=True)
    fresh.load_state_dict(unfused.state_dict(), strict=True)
