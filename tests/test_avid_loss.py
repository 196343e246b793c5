import copy

import pytest
import torch
import torch.nn.functional as F

from avidfast.losses import AVIDLoss, MemoryBank
from avidfast.losses.bank_pair import PAIRS
from avidfast.ops import reference

TERMS = {"cross": ["v2a", "a2v"], "self": ["v2v", "a2a"], "joint": ["v2a", "a2v", "v2v", "a2a"]}


def _plain_avid_step(state, video, audio, index, mode, num_items, k, t, m, seed, step, shared=False):
    """One AVID step written with the reference ops only: returns (loss, grads) and updates state.
    shared: one Z for every pair, the first pair's estimate."""
    video = video.detach().clone().requires_grad_()
    audio = audio.detach().clone().requires_grad_()
    emb = {"v": F.normalize(video, dim=1), "a": F.normalize(audio, dim=1)}
    banks = {"v": state["video"], "a": state["audio"]}
    neg = reference.sample_negatives(index, num_items, k, seed, step)
    if state["Z"] is None:
        state["Z"] = [
            reference.memory_scores(emb[term[0]].detach(), banks[term[2]], neg, t).exp().mean().item()
            for term in TERMS[mode]
        ]
        if shared:
            state["Z"] = [state["Z"][0]] * len(TERMS[mode])
    terms = [
        reference.nce_memory_loss(emb[term[0]], banks[term[2]], index, neg, t, state["Z"][i])
        for i, term in enumerate(TERMS[mode])
    ]
    loss = torch.stack(terms).mean()
    loss.backward()
    reference.memory_update_(state["video"], index, emb["v"].detach(), m)
    reference.memory_update_(state["audio"], index, emb["a"].detach(), m)
    return loss.detach(), video.grad, audio.grad


@pytest.mark.parametrize("partition", ["shared", "per_pair"])
@pytest.mark.parametrize("mode", ["cross", "self", "joint"])
def test_matches_plain_formulation_over_steps(mode, partition):
    num_items, k = 300, 50
    loss_fn = AVIDLoss(num_items, dim=16, num_negatives=k, mode=mode, seed=11, partition=partition)
    state = {"video": loss_fn.video_memory.memory.clone(), "audio": loss_fn.audio_memory.memory.clone(), "Z": None}
    for step in range(3):
        video = torch.randn(12, 16, requires_grad=True)
        audio = torch.randn(12, 16, requires_grad=True)
        index = torch.randperm(num_items)[:12]
        index[5] = index[2]  # a video seen twice in one batch
        loss, logs = loss_fn(video, audio, index)
        loss.backward()
        ref_loss, ref_vgrad, ref_agrad = _plain_avid_step(
            state, video, audio, index, mode, num_items, k, 0.07, 0.5, 11, step, shared=partition == "shared"
        )
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(video.grad, ref_vgrad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(audio.grad, ref_agrad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss_fn.video_memory.memory, state["video"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loss_fn.audio_memory.memory, state["audio"], rtol=1e-6, atol=1e-6)
        assert set(logs) == {"loss"} | {f"loss/{t}" for t in TERMS[mode]}
    estimated = loss_fn.Z[[PAIRS.index(pair) for pair in TERMS[mode]]]
    # Z ~ N/e: a float32 mean of exponentials of about 1e2 agrees to a few ulps, not one.
    torch.testing.assert_close(estimated, torch.tensor(state["Z"], dtype=torch.float32), rtol=1e-5, atol=0)
    unused = [z for pair, z in zip(PAIRS, loss_fn.Z.tolist()) if pair not in TERMS[mode]]
    if partition == "shared":
        torch.testing.assert_close(loss_fn.Z, torch.full((4,), state["Z"][0]), rtol=1e-5, atol=0)  # one Z, every entry
    else:
        assert all(z < 0 for z in unused), "a pair the mode does not use got a partition estimate"
    assert int(loss_fn.step) == 3


def test_banks_start_normalised_seeded_and_distinct():
    a, b = AVIDLoss(1000, dim=32, num_negatives=10, seed=4), AVIDLoss(1000, dim=32, num_negatives=10, seed=4)
    assert torch.equal(a.video_memory.memory, b.video_memory.memory)
    assert not torch.equal(a.video_memory.memory, a.audio_memory.memory)
    norms = a.audio_memory.memory.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    c = AVIDLoss(1000, dim=32, num_negatives=10, seed=5)
    assert not torch.equal(a.video_memory.memory, c.video_memory.memory)


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_banks_track_float32(bank_dtype):
    ours = AVIDLoss(500, dim=32, num_negatives=64, bank_dtype=bank_dtype, seed=2)
    full = AVIDLoss(500, dim=32, num_negatives=64, seed=2)
    full.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ours.state_dict().items()})
    video, audio, index = torch.randn(16, 32), torch.randn(16, 32), torch.randperm(500)[:16]
    loss, _ = ours(video, audio, index)
    loss_full, _ = full(video, audio, index)
    assert ours.video_memory.memory.dtype == bank_dtype
    torch.testing.assert_close(loss, loss_full, rtol=1e-2, atol=1e-2)


def test_state_dict_resumes_exactly():
    def batches():
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            yield torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.randperm(200, generator=g)[:8]

    straight = AVIDLoss(200, dim=16, num_negatives=20, seed=3)
    losses = [straight(*batch)[0] for batch in batches()]

    first = AVIDLoss(200, dim=16, num_negatives=20, seed=3)
    resumed = AVIDLoss(200, dim=16, num_negatives=20, seed=3)
    data = list(batches())
    for batch in data[:2]:
        first(*batch)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert resumed._estimated == set(PAIRS)
    resumed_losses = [resumed(*batch)[0] for batch in data[2:]]
    assert torch.equal(torch.stack(resumed_losses), torch.stack(losses[2:]))
    assert torch.equal(resumed.video_memory.memory, straight.video_memory.memory)
    assert set(straight.state_dict()) == {"video_memory.memory", "audio_memory.memory", "Z", "step"}


def test_torch_compile_of_a_training_step():
    torch._dynamo.reset()
    encoder = torch.nn.Linear(20, 16)
    loss_fn = AVIDLoss(100, dim=16, num_negatives=30, seed=1)
    eager = copy.deepcopy((encoder, loss_fn))

    def step(model, criterion, x, index):
        loss, _ = criterion(model(x), model(x.flip(1)), index)
        loss.backward()
        return loss

    compiled = torch.compile(step)
    for _ in range(3):
        x, index = torch.randn(6, 20), torch.randperm(100)[:6]
        got = compiled(encoder, loss_fn, x, index)
        expected = step(*eager, x, index)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder.weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_fn.audio_memory.memory, eager[1].audio_memory.memory, rtol=1e-5, atol=1e-6)
    assert int(loss_fn.step) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="both"), "mode must be one of"),
        (dict(num_negatives=99), "num_negatives"),
        (dict(num_negatives=0), "num_negatives"),
        (dict(temperature=0), "temperature"),
        (dict(momentum=2), "momentum"),
        (dict(bank_dtype=torch.int8), "dtype must be one of"),
    ],
)
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AVIDLoss(100, **{"dim": 8, "num_negatives": 10, **kwargs})


@pytest.mark.parametrize(
    "video, audio, index, message",
    [
        (torch.randn(4, 7), torch.randn(4, 8), torch.arange(4), "video_emb must be a floating"),
        (torch.randn(4, 8), torch.randn(3, 8), torch.arange(4), "but audio_emb has 3"),
        (torch.randn(4, 8), torch.randn(4, 8), torch.arange(3), "index must be an int64"),
        (torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 100]), "pos must lie in"),
    ],
)
def test_bad_batch_raises(video, audio, index, message):
    with pytest.raises(ValueError, match=message):
        AVIDLoss(100, dim=8, num_negatives=10)(video, audio, index)


def test_memory_bank_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_items"):
        MemoryBank(1)
    with pytest.raises(ValueError, match="dim"):
        MemoryBank(10, dim=0)


def _state(criterion):
    return {key: value.clone() for key, value in criterion.state_dict().items()}


def _assert_same_state(criterion, before):
    for key, value in criterion.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_first_batch_leaves_z_unset_and_the_banks_untouched(bad):
    from avidfast.errors import NonFiniteError

    criterion = AVIDLoss(100, dim=8, num_negatives=10, seed=1)
    before = _state(criterion)
    video, audio, index = torch.randn(6, 8), torch.randn(6, 8), torch.arange(6)
    poisoned = video.clone()
    poisoned[3, 2] = bad
    with pytest.raises(NonFiniteError, match=r"AVIDLoss \(step 0\): the first estimates of the partition constant Z "
                                             r"are not finite and positive \(nan, shared by every pair\): Z stays unset; the "
                                             r"banks, Z and the step counter are unchanged"):
        criterion(poisoned, audio, index)
    _assert_same_state(criterion, before)
    assert criterion._estimated == set() and (criterion.Z < 0).all()
    # the next finite batch starts the criterion exactly as if the bad one had never come
    loss, _ = criterion(video, audio, index)
    fresh = AVIDLoss(100, dim=8, num_negatives=10, seed=1)
    expected, _ = fresh(video, audio, index)
    assert torch.isfinite(loss) and torch.equal(loss, expected)
    for key, value in fresh.state_dict().items():
        assert torch.equal(criterion.state_dict()[key], value), key
    assert torch.isfinite(criterion.Z).all() and int(criterion.step) == 1


def test_a_non_finite_row_is_never_written_into_the_banks():
    from avidfast.errors import NonFiniteError

    criterion = AVIDLoss(100, dim=8, num_negatives=10, seed=1)
    criterion(torch.randn(6, 8), torch.randn(6, 8), torch.arange(6))  # Z estimated, step 1
    before = _state(criterion)
    audio = torch.randn(6, 8)
    audio[5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"AVIDLoss \(step 1\): the loss is nan; the banks, Z and the step counter "
                                             r"are unchanged.*non_finite='skip'"):
        criterion(torch.randn(6, 8), audio, torch.arange(10, 16))
    _assert_same_state(criterion, before)
    assert torch.isfinite(criterion.audio_memory.memory).all()


def test_skip_mode_counts_the_batch_and_returns_its_loss():
    criterion = AVIDLoss(100, dim=8, num_negatives=10, seed=1, non_finite="skip")
    video = torch.randn(6, 8)
    video[0] = float("nan")
    before = _state(criterion)
    loss, logs = criterion(video, torch.randn(6, 8), torch.arange(6))
    assert torch.isnan(loss) and torch.isnan(logs["loss"]) and criterion.skipped_updates == 1
    _assert_same_state(criterion, before)
    loss, _ = criterion(torch.randn(6, 8), torch.randn(6, 8), torch.arange(6))
    assert torch.isfinite(loss) and int(criterion.step) == 1 and criterion.skipped_updates == 1
    with pytest.raises(ValueError, match="non_finite must be one of"):
        AVIDLoss(100, dim=8, num_negatives=10, non_finite="ignore")


def test_commit_false_defers_the_update_until_commit():
    immediate = AVIDLoss(100, dim=8, num_negatives=10, seed=2)
    deferred = AVIDLoss(100, dim=8, num_negatives=10, seed=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        video, audio, index = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randperm(100, generator=g)[:6]
        expected, _ = immediate(video, audio, index)
        before = _state(deferred)
        loss, _ = deferred(video, audio, index, commit=False)
        _assert_same_state(deferred, before)  # nothing applied yet
        with pytest.raises(RuntimeError, match="still pending.*commit\\(\\) or discard\\(\\)"):
            deferred(video, audio, index)
        assert torch.equal(loss, expected) and deferred.commit()
    for key, value in immediate.state_dict().items():
        assert torch.equal(deferred.state_dict()[key], value), key
    before = _state(deferred)
    deferred(torch.randn(6, 8), torch.randn(6, 8), torch.arange(6), commit=False)
    deferred.discard()
    _assert_same_state(deferred, before)
    with pytest.raises(RuntimeError, match="nothing to commit"):
        deferred.commit()
    video = torch.randn(6, 8)
    video[2, 0] = float("inf")
    deferred(video, torch.randn(6, 8), torch.arange(6), commit=False)
    assert not deferred.commit()  # refused: the gathered embeddings are not finite
    _assert_same_state(deferred, before)
