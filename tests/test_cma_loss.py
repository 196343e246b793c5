import pytest
import torch
import torch.nn.functional as F

from avidfast.losses import AVIDLoss, CMALoss
from avidfast.losses.bank_pair import PAIRS
from avidfast.ops import reference, sample_negatives

NUM_ITEMS, DIM = 400, 16


def _plain_cma_step(state, video, audio, index, cfg, step):
    """One CMA step from the reference ops only; returns (loss, video grad, audio grad)."""
    video = video.detach().clone().requires_grad_()
    audio = audio.detach().clone().requires_grad_()
    emb = {"v": F.normalize(video, dim=1), "a": F.normalize(audio, dim=1)}
    banks = {"v": state["video"], "a": state["audio"]}
    positives = state["positives"][index]
    neg = reference.sample_negatives(index, NUM_ITEMS, cfg["num_negatives"], cfg["seed"], step, positives)
    within = neg[:, : cfg["num_negatives_within"]]
    weights = {k: cfg[k] for k in ("x_inst", "w_inst", "x_pos", "w_pos")}
    total = sum(weights.values())
    pairs = {"x_inst": ("v2a", "a2v"), "w_inst": ("v2v", "a2a"), "x_pos": ("v2a", "a2v"), "w_pos": ("v2v", "a2a")}
    scored = {"x_inst": (index, neg), "w_inst": (index, neg), "x_pos": (positives, neg), "w_pos": (positives, within)}
    if state["Z"] is None:  # one Z, from the first weighted term's first direction
        first = next(name for name, w in weights.items() if w > 0)
        pair = pairs[first][0]
        state["Z"] = reference.memory_scores(emb[pair[0]].detach(), banks[pair[2]], scored[first][1], 0.07).exp().mean().item()
    loss = 0
    for name, w in weights.items():
        if w == 0:
            continue
        pos, negs = scored[name]
        directions = [reference.nce_memory_loss(emb[p[0]], banks[p[2]], pos, negs, 0.07, state["Z"]) for p in pairs[name]]
        loss = loss + w / total * 0.5 * (directions[0] + directions[1])
    loss.backward()
    reference.memory_update_(state["video"], index, emb["v"].detach(), 0.5)
    reference.memory_update_(state["audio"], index, emb["a"].detach(), 0.5)
    return loss.detach(), video.grad, audio.grad


@pytest.mark.parametrize(
    "weights",
    [dict(x_inst=1.0, w_inst=0.0, x_pos=0.0, w_pos=1.0), dict(x_inst=0.3, w_inst=0.2, x_pos=0.4, w_pos=0.1)],
)
def test_matches_plain_formulation(weights):
    cfg = dict(num_negatives=60, num_negatives_within=12, seed=5, **weights)
    cma = CMALoss(NUM_ITEMS, DIM, num_positives=6, **cfg)
    cma.mine_positives(progress=False)
    _, ref_topk = reference.cma_topk(cma.video_memory.memory, cma.audio_memory.memory, 6)
    assert torch.equal(cma.positives, ref_topk.sort(dim=1).values)
    state = {"video": cma.video_memory.memory.clone(), "audio": cma.audio_memory.memory.clone(),
             "positives": cma.positives.clone(), "Z": None}
    for step in range(3):
        video, audio = torch.randn(10, DIM, requires_grad=True), torch.randn(10, DIM, requires_grad=True)
        index = torch.randperm(NUM_ITEMS)[:10]
        loss, logs = cma(video, audio, index)
        loss.backward()
        ref_loss, ref_vgrad, ref_agrad = _plain_cma_step(state, video, audio, index, cfg, step)
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(video.grad, ref_vgrad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(audio.grad, ref_agrad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cma.video_memory.memory, state["video"], rtol=1e-6, atol=1e-6)
        assert set(logs) == {"loss"} | {f"loss/{n}" for n, w in weights.items() if w > 0}


def test_negatives_never_hit_positives_or_self():
    cma = CMALoss(NUM_ITEMS, DIM, num_negatives=300, num_positives=32)
    cma.mine_positives(progress=False)
    index = torch.randperm(NUM_ITEMS)[:64]
    positives = cma.positives[index]
    negatives = sample_negatives(index, NUM_ITEMS, 300, cma.seed, cma.step, positives)
    assert not (negatives[:, :, None] == positives[:, None, :]).any()
    assert not (negatives == index[:, None]).any()
    assert not (positives == torch.arange(NUM_ITEMS)[index, None]).any()


def test_from_avid_takes_banks_partition_and_step():
    avid = AVIDLoss(NUM_ITEMS, DIM, num_negatives=40, seed=3, temperature=0.1)
    for _ in range(2):
        avid(torch.randn(8, DIM), torch.randn(8, DIM), torch.randperm(NUM_ITEMS)[:8])
    assert (avid.Z > 0).all() and (avid.Z == avid.Z[0]).all(), "a shared Z fills every entry"
    for source in (avid, avid.state_dict()):
        cma = CMALoss.from_avid(source, num_negatives=50, num_negatives_within=10, num_positives=4)
        assert torch.equal(cma.video_memory.memory, avid.video_memory.memory)
        assert torch.equal(cma.Z, avid.Z) and int(cma.step) == 2
        assert cma._estimated == set(PAIRS)
    per_pair = AVIDLoss(NUM_ITEMS, DIM, num_negatives=40, seed=3, partition="per_pair")
    per_pair(torch.randn(8, DIM), torch.randn(8, DIM), torch.randperm(NUM_ITEMS)[:8])
    assert per_pair.Z[0] != per_pair.Z[1] and (per_pair.Z[2:] < 0).all()
    shared = CMALoss.from_avid(per_pair.state_dict(), num_negatives=50, num_negatives_within=10, num_positives=4)
    mean = per_pair.Z[:2].double().mean().float()  # the reference's rule for a checkpoint's constants
    assert torch.equal(shared.Z, mean.expand(4)) and shared._estimated == set(PAIRS)
    kept = CMALoss.from_avid(per_pair, num_negatives=50, num_negatives_within=10, num_positives=4)
    assert kept.partition_mode == "per_pair" and torch.equal(kept.Z, per_pair.Z)
    assert CMALoss.from_avid(avid, num_negatives=50, num_negatives_within=10, num_positives=4).temperature == 0.1
    with pytest.raises(ValueError, match="not an AVIDLoss state_dict"):
        CMALoss.from_avid({"Z": avid.Z})


def test_set_epoch_mines_on_schedule_and_resumes_without_mining():
    cma = CMALoss(NUM_ITEMS, DIM, num_negatives=50, num_negatives_within=10, num_positives=4, resample_every=3)
    mined = []
    original = cma.mine_positives
    cma.mine_positives = lambda epoch=None, progress=True: (mined.append(epoch), original(epoch, False))
    for epoch in range(7):
        cma.set_epoch(epoch)
        cma(torch.randn(4, DIM), torch.randn(4, DIM), torch.randperm(NUM_ITEMS)[:4])
    assert mined == [0, 3, 6]
    resumed = CMALoss(NUM_ITEMS, DIM, num_negatives=50, num_negatives_within=10, num_positives=4, resample_every=3)
    resumed.load_state_dict(cma.state_dict())
    resumed.mine_positives = lambda epoch=None, progress=True: mined.append(("resumed", epoch))
    resumed.set_epoch(6)
    resumed.set_epoch(7)
    assert mined == [0, 3, 6] and torch.equal(resumed.positives, cma.positives)


def test_forward_before_mining_says_what_to_do():
    cma = CMALoss(NUM_ITEMS, DIM, num_negatives=50, num_negatives_within=10, num_positives=4)
    with pytest.raises(RuntimeError, match="call mine_positives"):
        cma(torch.randn(4, DIM), torch.randn(4, DIM), torch.arange(4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(agreement="overlap"), "agreement must be one of"),
        (dict(num_positives=0), "num_positives"),
        (dict(num_negatives=390, num_positives=10), "num_negatives must be smaller"),
        (dict(num_negatives_within=0), "num_negatives_within"),
        (dict(num_negatives=50, num_negatives_within=51), "num_negatives_within"),
        (dict(resample_every=0), "resample_every"),
        (dict(x_inst=0.0, w_pos=0.0), "term weights"),
        (dict(w_inst=-1.0), "term weights"),
        (dict(precision="low"), "precision"),
    ],
)
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CMALoss(NUM_ITEMS, DIM, **{"num_negatives": 100, "num_negatives_within": 10, **kwargs})


def test_a_non_finite_batch_changes_nothing():
    from avidfast.errors import NonFiniteError

    cma = CMALoss(NUM_ITEMS, DIM, num_negatives=50, num_negatives_within=10, num_positives=4)
    cma.mine_positives(progress=False)
    before = {key: value.clone() for key, value in cma.state_dict().items()}
    video = torch.randn(8, DIM)
    video[4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"CMALoss \(step 0\): the first estimates of the partition constant Z.*"
                                             r"Z stays unset"):
        cma(video, torch.randn(8, DIM), torch.randperm(NUM_ITEMS)[:8])
    for key, value in cma.state_dict().items():
        assert torch.equal(value, before[key]), key
    cma.non_finite = "skip"
    loss, _ = cma(video, torch.randn(8, DIM), torch.randperm(NUM_ITEMS)[:8])
    assert torch.isnan(loss) and cma.skipped_updates == 1
    for key, value in cma.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert CMALoss.from_avid(AVIDLoss(NUM_ITEMS, DIM, num_negatives=40, non_finite="skip"), num_negatives=50,
                             num_negatives_within=10, num_positives=4).non_finite == "skip"
