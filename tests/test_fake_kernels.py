"""The fake kernels (avidfast/ops/_checks.py) reject what the CPU kernels reject.

Every bad input below that the kernels can recognise from shapes, dtypes, devices and scalar
arguments raises the same ValueError eagerly and under FakeTensorMode (so torch.compile and
torch.export reject it while tracing). Checks on tensor values stay with the kernels.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import avidfast.ops  # registers the fake kernels
from avidfast.ops import reference
from conftest import unit_rows

OPS = torch.ops.avidfast


def _good(op: str) -> dict:
    """Valid arguments of torch.ops.avidfast.<op>, by schema name."""
    memory = unit_rows(40, 8)
    if op == "sample_negatives":
        return dict(pos=torch.tensor([0, 5, 9]), num_items=40, num_negatives=6, seed=1,
                    step=torch.tensor(3), row_offset=0, exclude=torch.tensor([[1, 2], [3, 4], [5, 6]]))
    if op == "memory_scores":
        return dict(x=torch.randn(3, 8), memory=memory, idx=torch.randint(0, 40, (3, 5)),
                    temperature=0.07)
    if op == "memory_scores_backward":
        return dict(grad_scores=torch.randn(3, 5), memory=memory, idx=torch.randint(0, 40, (3, 5)),
                    temperature=0.07)
    if op == "nce_memory_loss":
        return dict(x=torch.randn(3, 8), memory=memory, pos_idx=torch.randint(0, 40, (3, 2)),
                    neg_idx=torch.randint(0, 40, (3, 6)), temperature=0.07,
                    partition=torch.tensor(2.0, dtype=torch.float64))
    if op == "memory_update_":
        return dict(memory=memory, idx=torch.tensor([1, 7, 1]), x=torch.randn(3, 8), momentum=0.5)
    if op == "cma_topk":
        return dict(video_memory=memory, audio_memory=unit_rows(40, 8), k=5, mode="consensus",
                    queries=torch.tensor([0, 3]), precision="highest")
    raise KeyError(op)


# (op, changed arguments, message): rejected from metadata alone.
METADATA_CASES = [
    ("sample_negatives", dict(pos=torch.tensor([[0, 1]])), "pos must be a 1-D int64"),
    ("sample_negatives", dict(pos=torch.tensor([0, 1], dtype=torch.int32)), "pos must be a 1-D int64"),
    ("sample_negatives", dict(num_items=1), "num_items must be at least 2"),
    ("sample_negatives", dict(num_negatives=0), "num_negatives must be at least 1"),
    ("sample_negatives", dict(row_offset=-1), "row_offset must be >= 0"),
    ("sample_negatives", dict(step=torch.tensor([1, 2])), "step must be an int64 scalar"),
    ("sample_negatives", dict(step=torch.tensor(1, dtype=torch.int32)), "step must be an int64 scalar"),
    ("sample_negatives", dict(exclude=torch.tensor([1, 2, 3])), "exclude must be a 2-D"),
    ("sample_negatives", dict(exclude=torch.tensor([[1, 2]])), "exclude has 1 rows but pos has 3"),
    ("sample_negatives", dict(num_negatives=37), r"num_negatives \(37\) must be smaller than num_items - P - 1 = 37"),
    ("sample_negatives", dict(num_negatives=39, exclude=None), r"smaller than num_items - P - 1 = 39"),
    ("memory_scores", dict(x=torch.randn(8)), "x must be a 2-D"),
    ("memory_scores", dict(x=torch.ones(3, 8, dtype=torch.int64)), "x must be a floating"),
    ("memory_scores", dict(x=torch.randn(3, 7)), "x has dim 7 but memory rows have dim 8"),
    ("memory_scores", dict(idx=torch.zeros(3, 5, dtype=torch.int32)), "idx must be int64"),
    ("memory_scores", dict(idx=torch.zeros(3, dtype=torch.int64)), "idx must be 2-D"),
    ("memory_scores", dict(idx=torch.zeros(2, 5, dtype=torch.int64)), "idx has 2 rows but the batch has 3"),
    ("memory_scores", dict(memory=unit_rows(8, 40).t()), "memory must be contiguous"),
    ("memory_scores", dict(memory=torch.ones(40, 8, dtype=torch.int64)), "memory must be float32"),
    ("memory_scores", dict(memory=torch.randn(40)), "memory must be a 2-D"),
    ("memory_scores", dict(memory=torch.randn(0, 8)), "memory must have at least one row"),
    ("memory_scores", dict(temperature=0.0), "temperature must be a positive"),
    ("memory_scores", dict(temperature=float("inf")), "temperature must be a positive"),
    ("memory_scores_backward", dict(grad_scores=torch.randn(3)), "grad_scores must be a 2-D floating"),
    ("memory_scores_backward", dict(grad_scores=torch.ones(3, 5, dtype=torch.int64)), "grad_scores must be a 2-D floating"),
    ("memory_scores_backward", dict(grad_scores=torch.randn(3, 4)), "grad_scores has shape"),
    ("memory_scores_backward", dict(grad_scores=torch.randn(2, 5)), "idx has 3 rows but the batch has 2"),
    ("memory_scores_backward", dict(temperature=-1.0), "temperature must be a positive"),
    ("nce_memory_loss", dict(x=torch.randn(3, 9)), "x has dim 9"),
    ("nce_memory_loss", dict(pos_idx=torch.zeros(3, dtype=torch.int64)), "pos_idx must be 2-D"),
    ("nce_memory_loss", dict(neg_idx=torch.zeros(4, 6, dtype=torch.int64)), "neg_idx has 4 rows"),
    ("nce_memory_loss", dict(pos_idx=torch.zeros(3, 0, dtype=torch.int64)), "pos_idx must hold at least one"),
    ("nce_memory_loss", dict(neg_idx=torch.zeros(3, 0, dtype=torch.int64)), "neg_idx must hold at least one"),
    ("nce_memory_loss", dict(partition=torch.tensor([1.0, 2.0])), "Z .* must be a float or a one-element"),
    ("nce_memory_loss", dict(partition=torch.tensor(2)), "Z .* must be a float or a one-element"),
    ("nce_memory_loss", dict(temperature=float("nan")), "temperature must be a positive"),
    ("memory_update_", dict(idx=torch.zeros(3, 1, dtype=torch.int64)), "idx must be 1-D"),
    ("memory_update_", dict(idx=torch.zeros(2, dtype=torch.int64)), "idx has 2 rows"),
    ("memory_update_", dict(x=torch.randn(3, 4)), "x has dim 4"),
    ("memory_update_", dict(momentum=1.5), r"momentum must lie in \[0, 1\]"),
    ("memory_update_", dict(momentum=float("nan")), r"momentum must lie in \[0, 1\]"),
    ("cma_topk", dict(audio_memory=unit_rows(39, 8)), "audio_memory has shape"),
    ("cma_topk", dict(audio_memory=unit_rows(40, 8, torch.float64)), "audio_memory is"),
    ("cma_topk", dict(audio_memory=unit_rows(8, 40).t()), "audio_memory must be contiguous"),
    ("cma_topk", dict(video_memory=torch.ones(40, 8, dtype=torch.int64)), "memory must be float32"),
    ("cma_topk", dict(k=0), r"k must lie in \[1, num_items - 2\] = \[1, 38\]"),
    ("cma_topk", dict(k=39), r"k must lie in \[1, num_items - 2\]"),
    ("cma_topk", dict(mode="both"), "mode must be 'consensus', 'union', 'video' or 'audio', got 'both'"),
    ("cma_topk", dict(precision="low"), "precision must be 'highest' or 'high', got 'low'"),
    ("cma_topk", dict(queries=torch.tensor([0, 1], dtype=torch.int32)), "queries must be a 1-D int64"),
    ("cma_topk", dict(queries=torch.tensor([[0, 1]])), "queries must be a 1-D int64"),
]

# (op, changed arguments, message): rejected only after reading tensor values, by the kernels.
VALUE_CASES = [
    ("sample_negatives", dict(pos=torch.tensor([0, 40, 1])), r"pos must lie in \[0, 40\)"),
    ("sample_negatives", dict(exclude=torch.tensor([[2, 1], [3, 4], [5, 6]])), "must be sorted"),
    ("sample_negatives", dict(step=torch.tensor(-1)), "step must be >= 0"),
    ("memory_scores", dict(idx=torch.full((3, 5), 40)), r"idx must lie in \[0, 40\)"),
    ("nce_memory_loss", dict(partition=torch.tensor(0.0)), "Z .* must be positive"),
    ("cma_topk", dict(queries=torch.tensor([-1])), r"queries must lie in \[0, 40\)"),
]


def _call(op: str, args: dict):
    return getattr(OPS, op).default(**args)


def _call_fake(op: str, args: dict):
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        return _call(op, fake)


def _case_id(case) -> str:
    op, change, _ = case
    return f"{op}-{'-'.join(change)}"


@pytest.mark.parametrize("op, change, message", METADATA_CASES, ids=map(_case_id, METADATA_CASES))
def test_fake_kernel_rejects_what_the_kernel_rejects(op, change, message):
    args = {**_good(op), **change}
    with pytest.raises(ValueError, match=message):
        _call(op, args)
    with pytest.raises(ValueError, match=message):
        _call_fake(op, args)


@pytest.mark.parametrize("op, change, message", VALUE_CASES, ids=map(_case_id, VALUE_CASES))
def test_value_checks_are_left_to_the_kernels(op, change, message):
    args = {**_good(op), **change}
    with pytest.raises(ValueError, match=message):
        _call(op, args)
    _call_fake(op, args)  # a fake tensor has no values to check


@pytest.mark.parametrize(
    "op", ["sample_negatives", "memory_scores", "memory_scores_backward", "nce_memory_loss",
           "memory_update_", "cma_topk"])
def test_fake_kernel_matches_the_kernel_on_good_input(op):
    real = _call(op, _good(op))
    fake = _call_fake(op, _good(op))
    flat_real = real if isinstance(real, tuple) else (real,)
    flat_fake = fake if isinstance(fake, tuple) else (fake,)
    for r, f in zip(flat_real, flat_fake):
        if r is None:
            assert f is None
        else:
            assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device)


def _cuda(*shape, dtype=torch.float32):
    return lambda: torch.empty(shape, dtype=dtype, device="cuda")


@pytest.mark.parametrize(
    "op, change, message",
    [
        ("memory_scores", dict(x=_cuda(3, 8)), "x is on cuda:0 but memory is on cpu"),
        ("memory_scores", dict(idx=_cuda(3, 5, dtype=torch.int64)), "idx is on cuda:0 but memory is on cpu"),
        ("memory_scores_backward", dict(grad_scores=_cuda(3, 5)), "grad_scores is on cuda:0"),
        ("sample_negatives", dict(step=_cuda(dtype=torch.int64)), "step is on cuda:0 but pos is on cpu"),
        ("sample_negatives", dict(exclude=_cuda(3, 2, dtype=torch.int64)), "exclude is on cuda:0"),
        ("nce_memory_loss", dict(partition=_cuda()), "Z is on cuda:0 but memory is on cpu"),
        ("memory_update_", dict(x=_cuda(3, 8)), "x is on cuda:0"),
        ("cma_topk", dict(audio_memory=_cuda(40, 8)), "audio_memory is on cuda:0"),
        ("cma_topk", dict(queries=_cuda(2, dtype=torch.int64)), "queries is on cuda:0"),
    ],
)
def test_fake_kernel_rejects_mixed_devices(op, change, message):
    # FakeTensorMode makes CUDA tensors without a GPU (the kernels' check is the same).
    with FakeTensorMode() as mode:
        args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in _good(op).items()}
        args.update({k: make() for k, make in change.items()})
        with pytest.raises(ValueError, match=message):
            _call(op, args)


def test_a_cpu_step_and_z_may_go_with_cuda_tensors():
    with FakeTensorMode():
        pos = torch.zeros(3, dtype=torch.int64, device="cuda")
        assert OPS.sample_negatives(pos, 40, 6, 1, torch.tensor(2), 0, None).device == pos.device
        memory = torch.empty(40, 8, device="cuda")
        idx = torch.zeros(3, 2, dtype=torch.int64, device="cuda")
        loss, grad = OPS.nce_memory_loss(torch.empty(3, 8, device="cuda"), memory, idx, idx, 0.1,
                                         torch.tensor(2.0))
        assert loss.device == grad.device == memory.device


def test_torch_compile_rejects_a_bad_input_while_tracing():
    torch._dynamo.reset()
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    scores = torch.compile(lambda x, memory, idx: avidfast.ops.memory_scores(x, memory, idx, 0.07),
                           backend=backend, fullgraph=True, dynamic=False)
    memory, idx = unit_rows(40, 8), torch.randint(0, 40, (3, 5))
    with pytest.raises(Exception, match="x has dim 7 but memory rows have dim 8"):
        scores(torch.randn(3, 7), memory, idx)
    assert not graphs  # rejected by the fake kernel, before any graph reached the backend
    assert scores(torch.randn(3, 8), memory, idx).shape == (3, 5)
    assert len(graphs) == 1


def test_torch_compile_with_dynamic_shapes():
    torch._dynamo.reset()
    loss = torch.compile(
        lambda x, memory, pos, neg: avidfast.ops.nce_memory_loss(x, memory, pos, neg, 0.07, 2.0),
        backend="eager", fullgraph=True, dynamic=True)
    memory = unit_rows(40, 8)
    for batch in (3, 5):
        x = torch.randn(batch, 8, requires_grad=True)
        pos, neg = torch.randint(0, 40, (batch, 1)), torch.randint(0, 40, (batch, 6))
        loss(x, memory, pos, neg).backward()
        expected = reference.nce_memory_loss(x.detach(), memory, pos, neg, 0.07, 2.0)
        torch.testing.assert_close(loss(x, memory, pos, neg), expected.float(), rtol=1e-5, atol=1e-5)
        assert x.grad.shape == x.shape


LOAD_LIBRARY_ALONE = textwrap.dedent(
    """
    import sys
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.ops.load_library(sys.argv[1])
    assert not [m for m in sys.modules if m.startswith("avidfast")], "avidfast was imported"
    ops = torch.ops.avidfast
    modules = {
        "sample_negatives": "avidfast.ops.sampling",
        "memory_scores": "avidfast.ops.scores",
        "memory_scores_backward": "avidfast.ops.scores",
        "nce_memory_loss": "avidfast.ops.nce",
        "memory_update_": "avidfast.ops.update",
        "cma_topk": "avidfast.ops.cma",
    }
    for name, module in modules.items():
        stub = torch._C._dispatch_pystub("avidfast::" + name, "")
        assert stub is not None and stub[0] == module, (name, stub)

    with FakeTensorMode() as mode:
        args = (mode.from_tensor(torch.randn(3, 8)), mode.from_tensor(torch.randn(40, 8)),
                mode.from_tensor(torch.randint(0, 40, (3, 5))), 0.07)
        try:
            ops.memory_scores(*args)
        except Exception as error:
            # FakeTensorMode raises UnsupportedOperatorException from the dispatcher's error
            print("ERROR:", error.__context__ or error)
        else:
            raise SystemExit("the fake kernel ran before its module was imported")
        torch.ops.import_module("avidfast.ops.scores")
        out = ops.memory_scores(*args)
        assert out.shape == (3, 5) and out.dtype == torch.float32
        try:
            ops.memory_scores(mode.from_tensor(torch.randn(3, 7)), *args[1:])
        except ValueError as error:
            print("CHECKED:", error)
    """
)


def test_the_library_alone_names_the_module_of_its_fake_kernels():
    from avidfast import _C

    result = subprocess.run([sys.executable, "-c", LOAD_LIBRARY_ALONE, _C.__file__],
                            capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert "import the 'avidfast.ops.scores' Python module" in lines["ERROR"]
    assert "`import avidfast.ops` registers the fake and autograd kernels" in lines["ERROR"]
    assert lines["CHECKED"] == "x has dim 7 but memory rows have dim 8"


def _meta_cases():
    """(op, argument) for every tensor argument of every operator: that one moved to meta."""
    for op in ("sample_negatives", "memory_scores", "memory_scores_backward", "nce_memory_loss",
               "memory_update_", "cma_topk"):
        for name, value in _good(op).items():
            if isinstance(value, torch.Tensor):
                yield op, name


@pytest.mark.parametrize("op, name", list(_meta_cases()), ids=lambda v: v)
def test_meta_tensors_mixed_with_cpu_tensors_are_refused(op, name):
    # One argument on the meta device (no data) and the rest on the CPU: the dispatcher picks the
    # fake kernel, which must refuse rather than return an uninitialised result as a CPU tensor.
    # (A CPU step or Z may go with tensors on another device, not the reverse: refused too.)
    args = _good(op)
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match="is on (meta|cpu) but"):
        _call(op, args)


def test_losses_refuse_a_batch_on_another_device_than_their_banks():
    from avidfast.losses import AVIDLoss, MemoryNCE

    with pytest.raises(ValueError, match="embeddings is on meta but the bank is on cpu"):
        MemoryNCE(50, 8, 10)(torch.randn(4, 8, device="meta"), torch.arange(4))
    avid = AVIDLoss(50, dim=8, num_negatives=10)
    with pytest.raises(ValueError, match="is on (meta|cpu) but"):
        avid(torch.randn(4, 8, device="meta"), torch.randn(4, 8, device="meta"), torch.arange(4))
    with pytest.raises(ValueError, match="is on (meta|cpu) but"):
        avid(torch.randn(4, 8), torch.randn(4, 8), torch.arange(4, device="meta"))
