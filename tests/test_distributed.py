"""AVIDLoss under torch.distributed (gloo, 2 processes on this CPU)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avidfast.losses import AVIDLoss, CMALoss

NUM_ITEMS, DIM, STEPS = 120, 16, 3


def _batches(sizes):
    g = torch.Generator().manual_seed(42)
    out = []
    for _ in range(STEPS):
        total = sum(sizes)
        index = torch.randperm(NUM_ITEMS, generator=g)[:total]
        index[-1] = index[0]  # the same video on both ranks in one step
        out.append((torch.randn(total, DIM, generator=g), torch.randn(total, DIM, generator=g), index))
    return out


def _worker(rank, world, init_file, out_dir, sizes):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss_fn = AVIDLoss(NUM_ITEMS, dim=DIM, num_negatives=25, seed=9)
        start = sum(sizes[:rank])
        losses = []
        for video, audio, index in _batches(sizes):
            rows = slice(start, start + sizes[rank])
            loss, _ = loss_fn(video[rows], audio[rows], index[rows])
            losses.append(loss.detach())
        torch.save({"state": loss_fn.state_dict(), "losses": torch.stack(losses)}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(6, 6), (5, 3)])
def test_two_ranks_keep_identical_banks_equal_to_one_process(sizes):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, list(sizes)), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]

    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key} differs between ranks"

    single = AVIDLoss(NUM_ITEMS, dim=DIM, num_negatives=25, seed=9)
    single_rows = []
    for video, audio, index in _batches(sizes):
        _, logs = single(video, audio, index)
        single_rows.append(logs["loss"])
    state = ranks[0]["state"]
    assert torch.equal(state["video_memory.memory"], single.video_memory.memory)
    assert torch.equal(state["audio_memory.memory"], single.audio_memory.memory)
    torch.testing.assert_close(state["Z"], single.Z)
    # The global loss is the batch-size-weighted mean of the ranks' losses.
    weighted = (ranks[0]["losses"] * sizes[0] + ranks[1]["losses"] * sizes[1]) / sum(sizes)
    torch.testing.assert_close(weighted, torch.stack(single_rows), rtol=1e-5, atol=1e-5)


def _mining_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cma = CMALoss(NUM_ITEMS + 1, dim=DIM, num_negatives=25, num_negatives_within=5, num_positives=7, seed=4)
        cma.mine_positives(epoch=0, progress=False)
        video, audio, index = _batches((5, 5))[0]
        rows = slice(5 * rank, 5 * rank + 5)
        cma(video[rows], audio[rows], index[rows])
        torch.save(cma.state_dict(), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_mining_equals_single_process_mining():
    # NUM_ITEMS + 1 rows: the ranks' slices have different sizes.
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_mining_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    single = CMALoss(NUM_ITEMS + 1, dim=DIM, num_negatives=25, num_negatives_within=5, num_positives=7, seed=4)
    single.mine_positives(epoch=0, progress=False)
    assert torch.equal(ranks[0]["positives"], single.positives)
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"{key} differs between ranks"
    video, audio, index = _batches((5, 5))[0]
    single(video, audio, index)
    assert torch.equal(ranks[0]["video_memory.memory"], single.video_memory.memory)


def _gather_worker(rank, world, init_file, out_dir, sizes):
    from avidfast.distributed import all_gather_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(sizes[:rank])
        rows = torch.arange(start, start + sizes[rank])
        scores = torch.stack([rows.double(), -rows.double()], dim=1)
        gathered = all_gather_rows([scores, rows, rows % 3])
        torch.save(gathered, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(3, 5), (4, 0)])
def test_all_gather_rows_concatenates_uneven_ranks_in_rank_order(sizes):
    from avidfast.distributed import all_gather_rows

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gather_worker, args=(2, os.path.join(tmp, "init"), tmp, list(sizes)), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    rows = torch.arange(sum(sizes))
    for scores, index, label in ranks:  # every rank gets every row, rank 0's first
        assert torch.equal(index, rows) and torch.equal(label, rows % 3)
        assert torch.equal(scores, torch.stack([rows.double(), -rows.double()], dim=1))
    alone = torch.arange(4)
    assert torch.equal(all_gather_rows([alone])[0], alone)  # no process group: the rows themselves
    with pytest.raises(ValueError, match="same number of rows"):
        all_gather_rows([alone, torch.arange(3)])


def _non_finite_worker(rank, world, init_file, out_dir, sizes):
    from avidfast.errors import NonFiniteError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss_fn = AVIDLoss(NUM_ITEMS, dim=DIM, num_negatives=25, seed=9)
        start = sum(sizes[:rank])
        refused = []
        for step, (video, audio, index) in enumerate(_batches(sizes)):
            rows = slice(start, start + sizes[rank])
            video = video[rows].clone()
            if step == 1 and rank == 1:
                video[0, 0] = float("nan")  # one bad row on one rank only
            try:
                loss_fn(video, audio[rows], index[rows])
            except NonFiniteError as error:
                refused.append((step, str(error)))
        torch.save({"state": loss_fn.state_dict(), "refused": refused}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_non_finite_row_on_one_rank_is_refused_on_every_rank():
    sizes = (4, 3)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_non_finite_worker, args=(2, os.path.join(tmp, "init"), tmp, list(sizes)), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    assert [step for step, _ in ranks[0]["refused"]] == [step for step, _ in ranks[1]["refused"]] == [1]
    assert "rank 0" in ranks[0]["refused"][0][1] and "rank 1" in ranks[1]["refused"][0][1]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key} differs between ranks"
    single = AVIDLoss(NUM_ITEMS, dim=DIM, num_negatives=25, seed=9)  # the same run without the bad step
    for step, batch in enumerate(_batches(sizes)):
        if step != 1:
            single(*batch)
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], value), key
