"""MemoryNCE: instance discrimination with one bank, against the peers' equations (avidfast.bench.peers)."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avidfast.bench import peers
from avidfast.losses import MemoryNCE
from avidfast.losses.memory_nce import _PrecomputedGradient, _full_softmax, _sampled_softmax
from avidfast.ops import sample_negatives
from conftest import unit_rows

N, DIM, K, SEED = 300, 16, 40, 7


def _batches(steps=3, batch=12, repeat=False):
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        index = torch.randperm(N, generator=g)[:batch]
        if repeat:
            index[5] = index[2]  # an instance twice in one batch
        yield torch.randn(batch, DIM, generator=g), index


def _compare_with_peer(ours, peer_step, steps=3, repeat=False, tol=1e-5):
    """Runs ours and peer_step(embeddings, index, step) on the same batches; compares loss, grad, bank."""
    for step, (embeddings, index) in enumerate(_batches(steps, repeat=repeat)):
        x = embeddings.clone().requires_grad_()
        loss, logs = ours(x, index)
        loss.backward()
        x_peer = embeddings.clone().requires_grad_()
        peer_loss, peer_bank = peer_step(x_peer, index, step)
        torch.testing.assert_close(loss.detach(), peer_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(x.grad, x_peer.grad, rtol=10 * tol, atol=tol)
        torch.testing.assert_close(ours.bank.memory, peer_bank, rtol=1e-6, atol=1e-6)
        assert torch.equal(logs["loss"], loss.detach())
    assert int(ours.step) == steps


@pytest.mark.parametrize("eps, name", [(peers.LEMNISCATE_EPS, "lemniscate"), (peers.VISSL_EPS, "vissl")])
def test_nce_equals_lemniscate_and_vissl_nce(eps, name):
    ours = MemoryNCE(N, DIM, K, objective="nce", partition_estimate="with_positive", duplicates="last", seed=SEED)
    peer = peers.PeerNCE(ours.bank.memory.clone(), K, eps=eps)

    def peer_step(x, index, step):
        negatives = sample_negatives(index, N, K, SEED, step)  # the same draws as ours
        loss = peer.step(x, index, torch.cat([index[:, None], negatives], 1))
        return loss, peer.memory

    _compare_with_peer(ours, peer_step, repeat=True)
    # Z: the peer keeps N x mean(exp s); avidfast the mean itself.
    torch.testing.assert_close(ours.Z, peer.Z_peer.double() / N, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["mmselfsup", "vissl"])
def test_infonce_equals_mmselfsup_npid_and_vissl_cross_entropy(name):
    ours = MemoryNCE(N, DIM, K, objective="infonce", duplicates="last", seed=SEED)
    if name == "mmselfsup":
        peer = peers.PeerNPID(ours.bank.memory.clone(), K, momentum=0.5)  # m' = 1 - m = 0.5

        def peer_step(x, index, step):
            return peer.step(x, index, sample_negatives(index, N, K, SEED, step)), peer.feature_bank
    else:
        peer = peers.PeerNCE(ours.bank.memory.clone(), K, eps=peers.VISSL_EPS, loss_type="cross_entropy")

        def peer_step(x, index, step):
            columns = torch.cat([index[:, None], sample_negatives(index, N, K, SEED, step)], 1)
            return peer.step(x, index, columns), peer.memory

    _compare_with_peer(ours, peer_step, repeat=True)
    assert float(ours.Z) < 0  # no partition constant in a softmax


def test_softmax_equals_lemniscate_linear_average():
    ours = MemoryNCE(N, DIM, objective="softmax", duplicates="last", seed=SEED)
    peer = peers.PeerLinearAverage(ours.bank.memory.clone())
    _compare_with_peer(ours, lambda x, index, step: (peer.step(x, index), peer.memory), repeat=True)


def test_mmselfsup_momentum_is_the_complement():
    # SimpleMemory weights the new feature with m'; avidfast (and lemniscate) the old row with m.
    ours = MemoryNCE(N, DIM, K, objective="infonce", momentum=0.2, seed=SEED)
    peer = peers.PeerNPID(ours.bank.memory.clone(), K, momentum=0.8)
    _compare_with_peer(ours, lambda x, index, step: (
        peer.step(x, index, sample_negatives(index, N, K, SEED, step)), peer.feature_bank))


def test_default_partition_estimate_leaves_the_positive_out():
    ours = MemoryNCE(N, DIM, K, seed=SEED)
    embeddings, index = next(_batches())
    bank = ours.bank.memory.clone()
    ours(embeddings, index)
    x = torch.nn.functional.normalize(embeddings, dim=1).double()
    negatives = sample_negatives(index, N, K, SEED, 0)
    expected = (x @ bank.double().T / 0.07).exp().gather(1, negatives).mean()
    torch.testing.assert_close(ours.Z, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("objective", ["infonce", "softmax"])
def test_gradcheck_float64(objective):
    memory = unit_rows(50, 8, torch.float64)
    index = torch.randperm(50)[:4]
    columns = torch.cat([index[:, None], torch.randint(0, 50, (4, 9))], 1)

    def loss(x):
        rows = _sampled_softmax(x.detach(), memory, columns, 0.3) if objective == "infonce" \
            else _full_softmax(x.detach(), memory, index, 0.3)
        return _PrecomputedGradient.apply(x, *rows)

    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (x,))
    (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="MemoryNCE has no second derivative"):
        torch.autograd.grad(grad.sum(), x)


def test_opcheck_of_the_operators_as_memory_nce_calls_them():
    memory = unit_rows(N, DIM)
    index = torch.randperm(N)[:6]
    x = torch.nn.functional.normalize(torch.randn(6, DIM), dim=1).requires_grad_()
    step = torch.tensor(3)
    ops = torch.ops.avidfast
    torch.library.opcheck(ops.sample_negatives.default, (index, N, K, SEED, step, 0, None))
    negatives = ops.sample_negatives(index, N, K, SEED, step, 0, None)
    z = torch.tensor(2.5, dtype=torch.float64)  # MemoryNCE's Z buffer: a 0-d float64 tensor
    torch.library.opcheck(ops.nce_memory_loss.default, (x, memory, index[:, None], negatives, 0.07, z))
    columns = torch.cat([index[:, None], negatives], 1)
    torch.library.opcheck(ops.memory_scores.default, (x, memory, columns, 0.07))
    torch.library.opcheck(ops.memory_scores_backward.default, (torch.randn(6, K + 1), memory, columns, 0.07))
    torch.library.opcheck(ops.memory_update_.default, (memory.clone(), index, x.detach(), 0.5))


@pytest.mark.parametrize("objective", ["nce", "infonce", "softmax"])
def test_a_compiled_training_step_compiles_once_and_equals_eager(objective):
    torch._dynamo.reset()
    encoder = torch.nn.Linear(20, DIM)
    criterion = MemoryNCE(N, DIM, K, objective=objective, seed=SEED)
    eager = copy.deepcopy((encoder, criterion))
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def step(model, loss_fn, x, index):
        loss, _ = loss_fn(model(x), index)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step, backend=backend)
    g = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):  # Z and the step change every step
        for i in range(4):
            x, index = torch.randn(8, 20, generator=g), torch.randperm(N, generator=g)[:8]
            got = compiled(encoder, criterion, x, index)
            if i == 0:
                first = len(graphs)
            torch.testing.assert_close(got, step(*eager, x, index), rtol=1e-5, atol=1e-5)
    assert first > 0 and len(graphs) == first, "a later step compiled a new graph"
    torch.testing.assert_close(encoder.weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(criterion.bank.memory, eager[1].bank.memory, rtol=1e-5, atol=1e-6)
    assert torch.equal(criterion.Z, eager[1].Z) and int(criterion.step) == 4


def test_state_dict_resumes_exactly():
    batches = list(_batches(4))
    straight = MemoryNCE(N, DIM, K, seed=3)
    losses = [straight(*b)[0].detach() for b in batches]
    first, resumed = MemoryNCE(N, DIM, K, seed=3), MemoryNCE(N, DIM, K, seed=3)
    for b in batches[:2]:
        first(*b)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert resumed._estimated
    assert torch.equal(torch.stack([resumed(*b)[0].detach() for b in batches[2:]]), torch.stack(losses[2:]))
    assert torch.equal(resumed.bank.memory, straight.bank.memory)
    assert set(straight.state_dict()) == {"bank.memory", "Z", "step"}


def test_load_peer_memory_converts_the_partition_constant():
    ours = MemoryNCE(N, DIM, K, seed=3)
    bank = torch.rand(N, DIM) * 2 - 1  # lemniscate's uniform, unnormalised initial memory
    ours.load_peer_memory(bank, peer_Z=N * 2.5)
    assert torch.equal(ours.bank.memory, bank) and float(ours.Z) == 2.5 and ours._estimated
    ours.load_peer_memory(bank, peer_Z=-1)  # the peer had not estimated it yet
    assert float(ours.Z) < 0 and not ours._estimated
    with pytest.raises(ValueError, match="memory has shape"):
        ours.load_peer_memory(torch.zeros(N, DIM + 1))


def _worker(rank, world, init_file, out_dir, objective):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss_fn = MemoryNCE(N, DIM, K, objective=objective, seed=9)
        losses = []
        for embeddings, index in _batches(3, batch=10, repeat=True):
            rows = slice(5 * rank, 5 * rank + 5)
            losses.append(loss_fn(embeddings[rows], index[rows])[0].detach())
        torch.save({"state": loss_fn.state_dict(), "losses": torch.stack(losses)}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("objective", ["nce", "infonce"])
def test_two_ranks_equal_one_process(objective):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, objective), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key} differs between ranks"
    single = MemoryNCE(N, DIM, K, objective=objective, seed=9)
    single_losses = torch.stack([single(*b)[0].detach() for b in _batches(3, batch=10, repeat=True)])
    assert torch.equal(ranks[0]["state"]["bank.memory"], single.bank.memory)
    torch.testing.assert_close(ranks[0]["state"]["Z"], single.Z, rtol=1e-12, atol=0)
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, single_losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(objective="nce2"), "objective must be one of"),
        (dict(partition_estimate="all"), "partition_estimate must be one of"),
        (dict(num_negatives=N - 1), "num_negatives"),
        (dict(temperature=0), "temperature"),
        (dict(momentum=1.5), "momentum"),
        (dict(duplicates="first"), "duplicates must be one of"),
        (dict(nonfinite="ignore"), "nonfinite must be one of"),
        (dict(bank_dtype=torch.int8), "dtype must be one of"),
    ],
)
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MemoryNCE(N, **{"dim": DIM, "num_negatives": K, **kwargs})


@pytest.mark.parametrize(
    "embeddings, index, message",
    [
        (torch.randn(4, DIM + 1), torch.arange(4), "embeddings must be a floating"),
        (torch.randn(4, DIM), torch.arange(3), "index must be an int64"),
        (torch.randn(4, DIM), torch.tensor([0, 1, 2, N]), "pos must lie in"),
        (torch.randn(4, DIM, device="meta"), torch.arange(4), "embeddings is on meta but the bank is on cpu"),
        (torch.randn(4, DIM), torch.arange(4, device="meta"), "index is on meta but the bank is on cpu"),
    ],
)
def test_bad_batch_raises(embeddings, index, message):
    with pytest.raises(ValueError, match=message):
        MemoryNCE(N, DIM, K)(embeddings, index)


def test_a_nonfinite_embedding_raises_and_leaves_the_state():
    loss_fn = MemoryNCE(N, DIM, K, seed=2)
    embeddings, index = next(_batches())
    loss_fn(embeddings, index)
    state = copy.deepcopy(loss_fn.state_dict())
    embeddings[3, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"row 3 of x \(memory index {int(index[3])}\) holds NaN or inf"):
        loss_fn(embeddings, index)
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, state[key]), key
    fresh = MemoryNCE(N, DIM, K, seed=2)
    with pytest.raises(ValueError, match="partition estimate Z = nan"):
        fresh(embeddings, index)
    assert float(fresh.Z) < 0 and int(fresh.step) == 0
