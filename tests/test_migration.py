"""docs/migration.md runs: every before / after snippet of the guide, on the same batches and draws.

The *before* snippets run against tests/peer_api.py (the peers' class names and signatures, their
published equations via avidfast.bench.peers), the *after* snippets against avidfast. Losses,
gradients and banks must agree step by step.
"""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peer_api
from avidfast.losses.bank_pair import PAIRS
from avidfast.ops import estimate_partition, sample_negatives

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "migration.md"
SNIPPET = re.compile(r"<!-- snippet: (\S+) -->\n```python\n(.*?)```", re.S)
N, DIM, K, T, M = 300, 16, 40, 0.07, 0.5
CONSTANTS = dict(low_dim=DIM, ndata=N, nce_k=K, nce_t=T, nce_m=M,  # lemniscate / VISSL names
                 feat_dim=DIM, n_data=N,  # CMC's
                 length=N, neg_num=K, temperature=T, momentum=0.3)  # mmselfsup's (m' = 0.3)


@pytest.fixture(scope="module")
def snippets():
    if not GUIDE.is_file():
        pytest.skip("docs/migration.md is not beside the tests (an installed package)")
    found = dict(SNIPPET.findall(GUIDE.read_text(encoding="utf-8")))
    assert found, "no snippet found in docs/migration.md"
    return found


def _run(snippets, name, namespace=None, **extra):
    namespace = namespace if namespace is not None else {"torch": torch, "nn": nn, "F": F, **CONSTANTS}
    namespace.update(extra)
    exec(compile(snippets[name], f"docs/migration.md[{name}]", "exec"), namespace)
    return namespace


def _batches(views=1, steps=3, batch=12, repeat=True):
    g = torch.Generator().manual_seed(11)
    for _ in range(steps):
        index = torch.randperm(N, generator=g)[:batch]
        if repeat:
            index[7] = index[1]
        yield [torch.randn(batch, DIM, generator=g) for _ in range(views)], index


def _lockstep(before_step, after_step, batches, draws, banks, tol=1e-5):
    """Runs both steps on each batch (draws prepared for the peer); compares loss, grads, banks."""
    for embeddings, index in batches:
        draws.prepare(index)
        peer_inputs = [e.clone().requires_grad_() for e in embeddings]
        ours_inputs = [e.clone().requires_grad_() for e in embeddings]
        peer_loss = before_step(*peer_inputs, index)
        ours_loss = after_step(*ours_inputs, index)
        torch.testing.assert_close(ours_loss.detach(), peer_loss.detach(), rtol=tol, atol=tol)
        for ours, peer in zip(ours_inputs, peer_inputs):
            torch.testing.assert_close(ours.grad, peer.grad, rtol=10 * tol, atol=tol)
        for ours, peer in banks():
            torch.testing.assert_close(ours, peer, rtol=1e-6, atol=1e-6)


@pytest.fixture
def draws():
    peer_api.DRAWS = peer_api.Draws(N, K, seed=0)  # the modules' default seed
    yield peer_api.DRAWS
    peer_api.DRAWS = None


def test_every_snippet_is_run_here(snippets):
    run = {"lemniscate-nce/before", "lemniscate-nce/after", "lemniscate-nce/resume", "lemniscate-softmax/before",
           "lemniscate-softmax/after", "cmc/before", "cmc/after", "cmc/resume", "vissl/before", "vissl/after",
           "npid/before", "npid/after"}
    assert set(snippets) == run


def test_lemniscate_nce(snippets, draws):
    before = _run(snippets, "lemniscate-nce/before", NCEAverage=peer_api.NCEAverage, NCECriterion=peer_api.NCECriterion)
    after = _run(snippets, "lemniscate-nce/after")
    after["criterion"].bank.memory.copy_(before["lemniscate"].memory)  # the same random start
    _lockstep(before["step"], after["step"], _batches(), draws,
              lambda: [(after["criterion"].bank.memory, before["lemniscate"].memory)])
    torch.testing.assert_close(after["criterion"].Z, before["lemniscate"].params[2].double() / N, rtol=1e-6, atol=0)


def test_lemniscate_nce_resumed(snippets, draws):
    before = _run(snippets, "lemniscate-nce/before", NCEAverage=peer_api.NCEAverage, NCECriterion=peer_api.NCECriterion)
    batches = list(_batches(steps=3))
    embeddings, index = batches[0]
    draws.prepare(index)
    before["step"](embeddings[0].clone().requires_grad_(), index)  # the peer's first step sets its Z
    after = _run(snippets, "lemniscate-nce/after")
    _run(snippets, "lemniscate-nce/resume", after, lemniscate=before["lemniscate"])
    draws.step = 0  # avidfast's resumed module draws from step 0
    _lockstep(before["step"], after["step"], batches[1:], draws,
              lambda: [(after["criterion"].bank.memory, before["lemniscate"].memory)])


def test_lemniscate_softmax(snippets, draws):
    before = _run(snippets, "lemniscate-softmax/before", LinearAverage=peer_api.LinearAverage)
    after = _run(snippets, "lemniscate-softmax/after")
    after["criterion"].bank.memory.copy_(before["lemniscate"].memory)
    _lockstep(before["step"], after["step"], _batches(), draws,
              lambda: [(after["criterion"].bank.memory, before["lemniscate"].memory)])


def _cmc(snippets):
    return _run(snippets, "cmc/before", NCEAverage=peer_api.CMCNCEAverage, NCECriterion=peer_api.NCECriterion)


def test_cmc_resumed(snippets, draws):
    before = _cmc(snippets)
    batches = list(_batches(views=2, steps=3, repeat=False))  # AVIDLoss applies repeats in batch order
    (l, ab), index = batches[0]
    draws.prepare(index)
    before["step"](l.clone().requires_grad_(), ab.clone().requires_grad_(), index)
    after = _run(snippets, "cmc/after")
    _run(snippets, "cmc/resume", after, contrast=before["contrast"])
    draws.step = 0
    _lockstep(before["step"], after["step"], batches[1:], draws, lambda: [
        (after["criterion"].video_memory.memory, before["contrast"].memory_l),
        (after["criterion"].audio_memory.memory, before["contrast"].memory_ab)])


def test_cmc_from_scratch_differs_only_by_the_positive_in_z(snippets, draws):
    before = _cmc(snippets)
    after = _run(snippets, "cmc/after")
    criterion, contrast = after["criterion"], before["contrast"]
    criterion.video_memory.memory.copy_(contrast.memory_l)
    criterion.audio_memory.memory.copy_(contrast.memory_ab)
    memory_l, memory_ab = contrast.memory_l.clone(), contrast.memory_ab.clone()
    (l, ab), index = next(_batches(views=2, repeat=False))
    draws.prepare(index)
    before["step"](l.clone().requires_grad_(), ab.clone().requires_grad_(), index)
    after["step"](l.clone().requires_grad_(), ab.clone().requires_grad_(), index)
    negatives = sample_negatives(index, N, K, 0, 0)
    l_n, ab_n = F.normalize(l, dim=1), F.normalize(ab, dim=1)
    for pair, view, memory, peer_z in (("v2a", l_n, memory_ab, contrast.params[2]), ("a2v", ab_n, memory_l, contrast.params[3])):
        ours = criterion.Z[PAIRS.index(pair)].double()
        torch.testing.assert_close(ours, estimate_partition(view, memory, negatives, T), rtol=1e-5, atol=0)
        torch.testing.assert_close(peer_z.double() / N, estimate_partition(view, memory, negatives, T, pos_idx=index),
                                   rtol=1e-5, atol=0)


def test_vissl(snippets, draws):
    before = _run(snippets, "vissl/before", NCELossWithMemory=peer_api.NCELossWithMemory)
    after = _run(snippets, "vissl/after")
    after["loss_fn"].bank.memory.copy_(before["loss_fn"].memory)
    _lockstep(before["step"], after["step"], _batches(), draws,
              lambda: [(after["loss_fn"].bank.memory, before["loss_fn"].memory)])


def test_mmselfsup_npid(snippets, draws):
    before = _run(snippets, "npid/before", SimpleMemory=peer_api.SimpleMemory, ContrastiveHead=peer_api.ContrastiveHead)
    after = _run(snippets, "npid/after")
    after["criterion"].bank.memory.copy_(before["memory_bank"].feature_bank)
    assert after["criterion"].momentum == pytest.approx(0.7)
    _lockstep(before["step"], after["step"], _batches(), draws,
              lambda: [(after["criterion"].bank.memory, before["memory_bank"].feature_bank)])
