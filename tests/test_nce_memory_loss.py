import pytest
import torch

import avidfast.ops
from avidfast.ops import estimate_partition, nce_memory_loss, reference
from conftest import unit_rows


def _problem(batch=7, num_items=400, dim=32, positives=1, negatives=90, memory_dtype=torch.float32, x_dtype=torch.float32):
    memory = unit_rows(num_items, dim, memory_dtype)
    x = unit_rows(batch, dim, x_dtype).requires_grad_()
    pos = torch.randint(0, num_items, (batch, positives))
    neg = torch.randint(0, num_items, (batch, negatives))
    z = float(torch.empty(()).uniform_(0.5, 3.0))
    return x, memory, pos, neg, z


@pytest.mark.parametrize("positives", [1, 5])
@pytest.mark.parametrize(
    "memory_dtype, x_dtype, tol",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 1e-4),
        (torch.float16, torch.float32, 1e-4),
        (torch.float32, torch.bfloat16, 1e-4),
    ],
)
def test_value_and_gradient_equal_reference(positives, memory_dtype, x_dtype, tol):
    x, memory, pos, neg, z = _problem(positives=positives, memory_dtype=memory_dtype, x_dtype=x_dtype)
    loss = nce_memory_loss(x, memory, pos, neg, 0.07, z)
    (grad,) = torch.autograd.grad(loss, x)
    # The reference sees the same rounded inputs in float32, so only accumulation order differs.
    # (Its own bfloat16 gradient would sum two bfloat16-rounded partial gradients: compare with
    # its float32 gradient rounded once, as ours is.)
    x_ref = x.detach().float().requires_grad_()
    ref = reference.nce_memory_loss(x_ref, memory, pos, neg, 0.07, z)
    (grad_ref,) = torch.autograd.grad(ref, x_ref)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and grad.dtype == x_dtype
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    if x_dtype == torch.float32:
        torch.testing.assert_close(grad, grad_ref, rtol=tol * 10, atol=tol * 10)
    else:  # one bfloat16 rounding of nearly equal float32 values: at most one ulp apart
        torch.testing.assert_close(grad.float(), grad_ref.to(x_dtype).float(), rtol=2**-7, atol=1e-6)


def test_reduction_none_and_tensor_z():
    x, memory, pos, neg, z = _problem()
    rows = nce_memory_loss(x, memory, pos[:, 0], neg, 0.07, torch.tensor(z), reduction="none")
    ref = reference.nce_memory_loss(x, memory, pos, neg, 0.07, z, reduction="none")
    assert rows.shape == (x.shape[0],)
    torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5)
    weights = torch.rand(x.shape[0])
    (grad,) = torch.autograd.grad((rows * weights).sum(), x)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), x)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positives", [1, 3])
def test_gradcheck_float64(positives):
    x, memory, pos, neg, z = _problem(batch=4, num_items=60, dim=10, positives=positives, negatives=12,
                                      memory_dtype=torch.float64, x_dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: nce_memory_loss(x, memory, pos, neg, 0.2, z), (x,))
    assert torch.autograd.gradcheck(
        lambda x: nce_memory_loss(x, memory, pos, neg, 0.2, z, reduction="none"), (x,)
    )


def test_extreme_scores_stay_finite():
    # Scores of +-1/T far beyond exp's float range must not overflow (softplus form).
    x, memory, pos, neg, _ = _problem(dim=8)
    loss = nce_memory_loss(x * 1000, memory, pos, neg, 0.01, 1e-30)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_opcheck():
    x, memory, pos, neg, z = _problem(batch=3, negatives=6)
    torch.library.opcheck(
        torch.ops.avidfast.nce_memory_loss.default, (x, memory, pos, neg, 0.07, torch.tensor(z))
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(pos_idx=torch.tensor([[0], [400]])), "pos_idx must lie in"),
        (dict(neg_idx=torch.tensor([[0, 1], [2, -1]])), "neg_idx must lie in"),
        (dict(neg_idx=torch.empty(2, 0, dtype=torch.int64)), "at least one negative"),
        (dict(pos_idx=torch.empty(2, 0, dtype=torch.int64)), "at least one positive"),
        (dict(neg_idx=torch.tensor([[0, 1]])), "neg_idx has 1 rows"),
        (dict(Z=0.0), "Z .* must be positive"),
        (dict(Z=float("inf")), "Z .* must be positive"),
        (dict(Z=torch.ones(2)), "one-element"),
        (dict(temperature=-1.0), "temperature"),
        (dict(x=torch.randn(2, 5)), "x has dim 5"),
        (dict(reduction="sum"), "reduction"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    args = dict(x=torch.randn(2, 32), memory=unit_rows(400, 32), pos_idx=torch.tensor([[0], [1]]),
                neg_idx=torch.tensor([[2, 3], [4, 5]]), temperature=0.07, Z=1.0)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        nce_memory_loss(**args)


def test_a_second_derivative_raises_instead_of_dropping_terms():
    # The backward pass reuses the forward pass's gradient, which has no graph: create_graph=True
    # used to give a gradient whose own derivative silently lacked the loss's Hessian.
    x, memory, pos, neg, z = _problem(batch=4, num_items=60, dim=10, negatives=12,
                                      memory_dtype=torch.float64, x_dtype=torch.float64)
    (grad,) = torch.autograd.grad(nce_memory_loss(x, memory, pos, neg, 0.2, z), x, create_graph=True)
    with pytest.raises(RuntimeError, match="nce_memory_loss has no second derivative"):
        torch.autograd.grad(grad.square().sum(), x)
    # Mixed with a term that has one (a gradient penalty on the sum): still an error, not a
    # Hessian with the NCE part missing.
    total = nce_memory_loss(x, memory, pos, neg, 0.2, z) + x.pow(3).sum()
    (grad,) = torch.autograd.grad(total, x, create_graph=True)
    with pytest.raises(RuntimeError, match="nce_memory_loss has no second derivative"):
        torch.autograd.grad(grad.square().sum(), x)
    # Without create_graph nothing changes.
    (first,) = torch.autograd.grad(nce_memory_loss(x, memory, pos, neg, 0.2, z), x)
    (ref,) = torch.autograd.grad(reference.nce_memory_loss(x, memory, pos, neg, 0.2, z), x)
    torch.testing.assert_close(first, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_positive", [False, True])
def test_estimate_partition_is_the_mean_of_exponentiated_scores(with_positive):
    x, memory, pos, neg, _ = _problem(batch=6, negatives=40)
    z = estimate_partition(x, memory, neg, 0.07, pos_idx=pos[:, 0] if with_positive else None)
    columns = torch.cat([pos, neg], 1) if with_positive else neg
    expected = (x.detach().double() @ memory.double().T / 0.07).exp().gather(1, columns).mean()
    assert z.dtype == torch.float64 and z.dim() == 0 and not z.requires_grad
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=0)


def test_a_peer_partition_constant_divided_by_n_gives_the_same_loss():
    # lemniscate / CMC: Z_peer = N * mean(exp s) over the K + 1 scored columns; their criterion
    # compares exp(s) / Z_peer with K / N. Written from those equations, on the same draws.
    num_items, k, t = 400, 90, 0.07
    x, memory, pos, neg, _ = _problem(num_items=num_items, negatives=k, memory_dtype=torch.float64,
                                      x_dtype=torch.float64)
    columns = torch.cat([pos, neg], 1)
    p = ((x @ memory.T) / t).exp().gather(1, columns)
    z_peer = num_items * p.detach().mean()
    p = p / z_peer
    noise = k / num_items
    peer = -(torch.log(p[:, 0] / (p[:, 0] + noise)) + torch.log(noise / (p[:, 1:] + noise)).sum(1)).mean()
    (peer_grad,) = torch.autograd.grad(peer, x)
    z = estimate_partition(x, memory, neg, t, pos_idx=pos)
    torch.testing.assert_close(z, z_peer / num_items, rtol=1e-12, atol=0)
    ours = nce_memory_loss(x, memory, pos, neg, t, z_peer / num_items)
    (grad,) = torch.autograd.grad(ours, x)
    torch.testing.assert_close(ours, peer, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, peer_grad, rtol=1e-9, atol=1e-10)
    # The trap: the peer's Z passed unchanged is a different objective.
    wrong = nce_memory_loss(x, memory, pos, neg, t, z_peer)
    assert (wrong - peer).abs() > 1.0


def test_a_compiled_step_with_a_changing_z_and_step_compiles_once():
    # Z as a 0-d tensor and the step as a tensor are graph inputs; as Python numbers they would
    # be constants of the graph (a guard such as `Z == 2.1`), recompiled for every new value.
    torch._dynamo.reset()
    memory = unit_rows(200, 16)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def step(x, memory, index, z, step):
        x = torch.nn.functional.normalize(x, dim=1)
        negatives = avidfast.ops.sample_negatives(index, 200, 20, 3, step)
        loss = nce_memory_loss(x, memory, index, negatives, 0.07, z)
        avidfast.ops.memory_update_(memory, index, x.detach(), 0.5)
        return loss

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    eager_memory = memory.clone()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(4):
            x, index = torch.randn(8, 16), torch.randperm(200)[:8]
            z, s = torch.tensor(2.1 + 0.3 * i, dtype=torch.float64), torch.tensor(i)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            loss = compiled(x1, memory, index, z, s)
            loss.backward()
            if i == 0:
                first = len(graphs)
            expected = step(x2, eager_memory, index, z, s)
            expected.backward()
            torch.testing.assert_close(loss, expected)
            torch.testing.assert_close(x1.grad, x2.grad)
    assert first > 0 and len(graphs) == first
    torch.testing.assert_close(memory, eager_memory)
