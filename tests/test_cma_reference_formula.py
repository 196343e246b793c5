"""CMALoss against the AVID-CMA objective written out here from its equations (no avidfast op).

For a query embedding q (L2-normalised), a bank M, a set of positives P and K_t negatives, with
scores s_j = <q, M_j> / T and h(s) = e^s / (e^s + K_t Z), the NCE loss of a row is
    -(1 / |P|) sum_{p in P} log h(s_p) - sum_{n} log(1 - h(s_n)),
averaged over the batch. A term is the mean of its two directions (video query / audio query);
the loss is the weighted sum of the terms with weights normalised to sum 1:
    x_inst: P = {i}, cross-modal banks, all K negatives;  w_inst: P = {i}, own-modality banks, all K;
    x_pos:  P = P_i, cross-modal banks, all K negatives;   w_pos: P = P_i, own-modality banks, first K_w.
One partition constant Z serves every term: the one a CMA stage starts with, or, when there is
none, the mean of e^s over the first weighted term's first direction's negatives on the first
step (then frozen). After each step both banks move: M_i <- normalise(m M_i + (1 - m) x_i).
"""
import pytest
import torch
import torch.nn.functional as F

import avidfast.losses.cma as cma_module
from avidfast.losses import CMALoss

N, D, K, K_W, P = 300, 16, 48, 12, 5
TEMPERATURE, MOMENTUM = 0.07, 0.5
# term -> (query modality, bank modality) of its two directions, and whether it uses P_i
TERM_DIRECTIONS = {
    "x_inst": ((("v", "a"), ("a", "v")), False),
    "w_inst": ((("v", "v"), ("a", "a")), False),
    "x_pos": ((("v", "a"), ("a", "v")), True),
    "w_pos": ((("v", "v"), ("a", "a")), True),
}
WEIGHTINGS = [
    dict(x_inst=1.0, w_inst=0.0, x_pos=0.0, w_pos=0.0),
    dict(x_inst=0.0, w_inst=1.0, x_pos=0.0, w_pos=0.0),
    dict(x_inst=0.0, w_inst=0.0, x_pos=1.0, w_pos=0.0),
    dict(x_inst=0.0, w_inst=0.0, x_pos=0.0, w_pos=1.0),
    dict(x_inst=1.0, w_inst=0.0, x_pos=0.0, w_pos=1.0),  # the paper's CMA
    dict(x_inst=0.0, w_inst=0.0, x_pos=2.0, w_pos=1.0),
    dict(x_inst=0.3, w_inst=0.2, x_pos=0.4, w_pos=0.1),
]


def _row_nce(query, bank, positives, negatives, z):
    """(B,) NCE losses of the rows, float64 (positives (B, |P|), negatives (B, K_t))."""
    k_t = negatives.shape[1]
    s_pos = torch.einsum("bd,bpd->bp", query, bank[positives]) / TEMPERATURE
    s_neg = torch.einsum("bd,bnd->bn", query, bank[negatives]) / TEMPERATURE
    h_pos = s_pos.exp() / (s_pos.exp() + k_t * z)
    h_neg = s_neg.exp() / (s_neg.exp() + k_t * z)
    return -h_pos.log().mean(dim=1) - (1 - h_neg).log().sum(dim=1)


def _formula_step(state, video, audio, index, positives, negatives, weights):
    """Loss and gradients of one step, then the bank update; state holds float64 banks and Z."""
    video = video.detach().double().requires_grad_()
    audio = audio.detach().double().requires_grad_()
    query = {"v": video / video.norm(dim=1, keepdim=True), "a": audio / audio.norm(dim=1, keepdim=True)}
    banks = {"v": state["v"], "a": state["a"]}
    used = {name: w for name, w in weights.items() if w > 0}
    total = sum(used.values())

    def term_inputs(name):
        own = index[:, None]
        pos = positives if TERM_DIRECTIONS[name][1] else own
        neg = negatives[:, :K_W] if name == "w_pos" else negatives
        return pos, neg

    if state["Z"] is None:
        first = next(iter(used))
        q, b = TERM_DIRECTIONS[first][0][0]
        _, neg = term_inputs(first)
        with torch.no_grad():
            state["Z"] = (torch.einsum("bd,bnd->bn", query[q], banks[b][neg]) / TEMPERATURE).exp().mean()
    loss = 0
    for name, w in used.items():
        pos, neg = term_inputs(name)
        directions = [_row_nce(query[q], banks[b], pos, neg, state["Z"]).mean() for q, b in TERM_DIRECTIONS[name][0]]
        loss = loss + (w / total) * 0.5 * (directions[0] + directions[1])
    loss.backward()
    with torch.no_grad():
        for m in ("v", "a"):
            moved = MOMENTUM * banks[m][index] + (1 - MOMENTUM) * query[m]
            banks[m][index] = moved / moved.norm(dim=1, keepdim=True)
    return loss.detach(), video.grad, audio.grad


def _recording_sampler(monkeypatch):
    """Records the negative indices CMALoss draws, so that the formula is fed the same ones."""
    drawn = []
    original = cma_module.sample_negatives

    def record(*args, **kwargs):
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(cma_module, "sample_negatives", record)
    return drawn


def _assert_relative(ours, theirs, what):
    error = float((ours.double() - theirs).norm() / theirs.norm())
    assert error <= 1e-4, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("start", ["estimated", "carried"])
@pytest.mark.parametrize("weights", WEIGHTINGS, ids=lambda w: "-".join(f"{k}{v:g}" for k, v in w.items() if v > 0))
def test_loss_and_gradients_equal_the_formula(weights, start, monkeypatch):
    drawn = _recording_sampler(monkeypatch)
    cma = CMALoss(N, D, num_negatives=K, num_negatives_within=K_W, num_positives=P, seed=7,
                  temperature=TEMPERATURE, momentum=MOMENTUM, **weights)
    if start == "carried":  # a Z from the AVID stage, as from_avid gives it
        cma.Z.fill_(0.0123)
        cma.load_state_dict(cma.state_dict())
    cma.mine_positives(progress=False)
    state = {"v": cma.video_memory.memory.double().clone(), "a": cma.audio_memory.memory.double().clone(),
             "Z": torch.tensor(0.0123, dtype=torch.float64) if start == "carried" else None}
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        index = torch.randperm(N, generator=generator)[:10]
        video = torch.randn(10, D, generator=generator, requires_grad=True)
        audio = torch.randn(10, D, generator=generator, requires_grad=True)
        positives = cma.positives[index].clone()
        loss, logs = cma(video, audio, index)
        loss.backward()
        negatives = drawn[-1]
        assert negatives.shape == (10, K)
        assert not (negatives[:, :, None] == positives[:, None, :]).any(), "a negative from the positive set"
        ref_loss, ref_vgrad, ref_agrad = _formula_step(state, video, audio, index, positives, negatives, weights)
        _assert_relative(loss.detach(), ref_loss, "loss")
        _assert_relative(video.grad, ref_vgrad, "video gradient")
        _assert_relative(audio.grad, ref_agrad, "audio gradient")
        assert torch.allclose(cma.Z.double(), state["Z"].expand(4), rtol=1e-5), "one Z, the formula's"
    _assert_relative(cma.video_memory.memory, state["v"], "video bank after 3 steps")
    _assert_relative(cma.audio_memory.memory, state["a"], "audio bank after 3 steps")


def test_the_formula_tells_the_within_modal_prefix_from_all_negatives(monkeypatch):
    """The comparison above can fail: the formula with K_w on the cross-modal positive term (the
    mistake this test guards against) gives another loss."""
    drawn = _recording_sampler(monkeypatch)
    weights = dict(x_inst=0.0, w_inst=0.0, x_pos=1.0, w_pos=0.0)
    cma = CMALoss(N, D, num_negatives=K, num_negatives_within=K_W, num_positives=P, seed=7, **weights)
    cma.mine_positives(progress=False)
    index = torch.arange(10)
    video, audio = torch.randn(10, D), torch.randn(10, D)
    positives = cma.positives[index].clone()
    banks = {"v": cma.video_memory.memory.double().clone(), "a": cma.audio_memory.memory.double().clone()}
    loss, _ = cma(video, audio, index)
    truncated = _formula_step(dict(banks, Z=None), video, audio, index, positives, drawn[-1][:, :K_W],
                              weights)[0]
    assert abs(float(loss) - float(truncated)) / float(truncated) > 1e-2
