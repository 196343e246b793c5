"""Launch plans of the CUDA kernels, checked on the CPU.

The planners are pure host code (csrc/ops/launch_plan.h), run here through avidfast._C's test
hooks (_plan_rows, _plan_rows_splits, _plan_memory_update, _plan_cma_topk). The kernels' static
shared memory and registers come from csrc/ops/cuda/resource_usage.json, which `make cuda-check`
writes from the built library with cuobjdump (and fails on when the committed table is stale).

For every shape swept (D, P + K or M, x and bank dtypes, alignment, batch sizes), a plan must fit
the limits its kernel meets at launch: static + dynamic shared memory within the 48 KiB a block
gets without opting in (cma_topk: within the device's opt-in maximum), the block size within the
kernel's launch bounds, the grid within CUDA's limits, at least one resident block per SM on each
device of DEVICES (the occupancy calculator's rules: threads, registers, shared memory, blocks),
and as much shared memory as the kernel indexes. Before issue 20 the rows kernel's NCE
instantiations and memory_update_ were planned against 48 KiB of dynamic memory alone, and their
static __shared__ arrays pushed some D over the limit (a launch failure on the GPU).
"""
import functools
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch  # noqa: F401  (loads libtorch before avidfast._C)

_C = pytest.importorskip("avidfast._C")

ROOT = Path(__file__).resolve().parents[1]
TABLE_PATH = ROOT / "csrc" / "ops" / "cuda" / "resource_usage.json"
if not TABLE_PATH.is_file():
    pytest.skip(f"{TABLE_PATH} is absent (tests run outside the source tree)", allow_module_level=True)
TABLE = json.loads(TABLE_PATH.read_text())
FIELD = {name: i for i, name in enumerate(TABLE["fields"])}
CONST = _C._launch_constants()
LIMIT = CONST["default_shared_bytes"]  # 48 KiB: static + dynamic without opting in


@dataclass(frozen=True)
class Device:
    """The per-SM limits of the occupancy calculator for one GPU, and the table arch it runs."""

    name: str
    arch: str  # the machine code it runs: sm_80 code on 8.x, sm_90 PTX compiled at load on 10.x / 12.x
    sms: int
    shared_per_sm: int
    max_optin: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin
    threads_per_sm: int
    blocks_per_sm: int
    registers_per_sm: int = 65536
    reserved_shared: int = 1024  # per block, by the system (sm_80 and later)


DEVICES = [
    Device("A100 (8.0)", "sm_80", 108, 167936, 166912, 2048, 32),
    Device("A10 / RTX 3090 (8.6)", "sm_80", 84, 102400, 101376, 1536, 16),
    Device("L4 / RTX 4090 (8.9)", "sm_80", 128, 102400, 101376, 1536, 24),
    Device("H100 / H200 (9.0)", "sm_90", 132, 233472, 232448, 2048, 32),
    Device("B200 (10.0)", "sm_90", 148, 233472, 232448, 2048, 32),
    Device("RTX 5090 (12.0)", "sm_90", 170, 102400, 101376, 1536, 32),
]


def _kernel(name: str) -> dict:
    assert name in TABLE["kernels"], (
        f"{name} is not in {TABLE_PATH.name}; run `make cuda-check` and commit the new table")
    return TABLE["kernels"][name]


@functools.lru_cache(maxsize=None)
def _resource_cached(names, field: str, arch) -> int:
    values = []
    for name in names:
        for kernel_arch, row in _kernel(name).items():
            if arch is None or kernel_arch == arch:
                values.append(row[FIELD[field]])
    assert values, (names, arch)
    return max(values)


def _resource(names, field: str, arch=None) -> int:
    """The largest value of `field` over the kernels `names` (and the table's archs, or `arch`)."""
    return _resource_cached(tuple(names), field, arch)


def occupancy(device: Device, threads: int, shared: int, registers: int, shared_limit: int) -> int:
    """Resident blocks per SM (0: the launch fails), by the rules of CUDA's occupancy calculator."""
    if threads < 1 or threads > 1024 or shared > shared_limit:
        return 0
    warps = math.ceil(threads / 32)
    by_threads = device.threads_per_sm // (warps * 32)
    registers_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = (device.registers_per_sm // registers_per_warp) // warps
    by_shared = device.shared_per_sm // (shared + device.reserved_shared)
    return min(by_threads, by_registers, by_shared, device.blocks_per_sm)


# ---------------------------------------------------------------------------------------------
# The resource table

ACC = {"float": 4, "double": 8}
MEM = {"float": 4, "double": 8, "Half": 2, "BFloat16": 2}
X = ("float", "double", "Half", "BFloat16")
VECS = (0, 1, 2, 4, 8)
# Policy: (name, needs a dot (x staged), accumulates (one accumulator per warp))
POLICIES = {
    "nce_memory_loss": ("NcePolicy", True, True),
    "memory_scores": ("ScoresPolicy", True, False),
    "memory_scores_backward": ("ScoresBackwardPolicy", False, True),
}


def rows_kernels(policy: str, acc: str, mem: str):
    return [f"rows_kernel<{vec}, {acc}, {mem}, {policy}<{acc}>>" for vec in VECS]


def test_table_covers_every_kernel_of_the_library():
    expected = [name for policy, _, _ in POLICIES.values() for acc in ACC for mem in MEM
                for name in rows_kernels(policy, acc, mem)]
    expected += [f"memory_update_kernel<{x}, {mem}>" for x in X for mem in MEM]
    expected += [f"sum_splits_kernel<{acc}>" for acc in ACC]
    expected += [f"cma_topk_kernel<(Math){m}>" for m in range(4)]
    expected += ["merge_splits_kernel", "merge_exclusions_kernel", "draw_negatives_kernel"]
    for name in expected:
        assert set(_kernel(name)) == set(TABLE["archs"]), name
    assert not set(TABLE["kernels"]) - set(expected), "kernels this test does not know of"
    assert {"sm_80", "sm_90"} <= set(TABLE["archs"])


# sm_90 machine code: ptxas reserves 1 KiB of static shared memory in every kernel of a module
# that declares dynamic shared memory (`extern __shared__`: every .cu but sample_negatives.cu), on
# top of its own __shared__ arrays; sm_80 code does not. The launchers read the real size at run
# time (cudaFuncGetAttributes); the plans here use the largest over the archs.
RESERVED_SM90 = 1024


def _declared(name: str, arch: str, own: int) -> int:
    uses_dynamic = not name.startswith(("draw_negatives", "merge_exclusions"))
    return own + (RESERVED_SM90 if arch == "sm_90" and uses_dynamic else 0)


def test_table_records_the_static_shared_arrays_the_kernels_declare():
    for name, row in TABLE["kernels"].items():
        own = 0
        if name.startswith("rows_kernel") and "NcePolicy" in name:
            own = CONST["rows_max_warps"] * ACC["double" if "NcePolicy<double>" in name else "float"]
        elif name.startswith("memory_update_kernel"):  # warp_sums[256 / 32] row_t, flags[256 * 8]
            threads = CONST["update_max_threads"]
            own = threads // 32 * (8 if name.endswith(", double>") else 4) + threads * CONST["update_scan_per_thread"]
        for arch, values in row.items():
            assert values[FIELD["static_shared"]] == _declared(name, arch, own), (name, arch, values)
    # The sizes of issue 20 (sm_80): NCE 32 B (float) / 64 B (double), memory_update_ 2080 / 2112 B.
    assert _resource(rows_kernels("NcePolicy", "float", "float"), "static_shared", "sm_80") == 32
    assert _resource(rows_kernels("NcePolicy", "double", "double"), "static_shared", "sm_80") == 64
    assert _resource(["memory_update_kernel<float, float>"], "static_shared", "sm_80") == 2080
    assert _resource(["memory_update_kernel<float, double>"], "static_shared", "sm_80") == 2112


# ---------------------------------------------------------------------------------------------
# The rows kernel: memory_scores, memory_scores_backward, nce_memory_loss

# P + K (or M): every first guess of the warp count (1..8) for each rows-in-flight (1, 2, 4), and
# the issue's boundary cases.
TERMS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 20, 24, 25, 28, 29, 32, 33, 4097)
BATCHES = (1, 3, 300, 4096, 65536)
DIMS = torch.arange(1, 13001)  # past the global fallback of every policy and dtype


def plan_rows(op, acc, mem, dims, terms, aligned, static_shared):
    """Plans of D = dims (a 1-D int64 tensor): (vec, warps, smem, global) tensors."""
    _, needs_dot, accumulate = POLICIES[op]
    vec, warps, smem, global_ = _C._plan_rows(terms, dims.tolist(), ACC[acc], MEM[mem], aligned,
                                              needs_dot, accumulate, static_shared)
    return torch.tensor(vec), torch.tensor(warps), torch.tensor(smem), torch.tensor(global_)


def rows_violations(op, acc, mem, dims, terms, aligned, static_shared, arch):
    """('reason: D = ...' for every kind of limit some plan breaks, the plans)."""
    _, needs_dot, accumulate = POLICIES[op]
    vec, warps, smem, global_ = plan_rows(op, acc, mem, dims, terms, aligned, static_shared)
    elems = 16 // MEM[mem]
    x_rows = 1 if needs_dot else 0
    needed = (x_rows + (warps if accumulate else 0)) * dims * ACC[acc]
    one_warp = (x_rows + (1 if accumulate else 0)) * dims * ACC[acc]
    words_per_lane = (torch.div(dims, elems, rounding_mode="floor") + 31) // 32
    checks = {
        f"{static_shared} static + the dynamic shared bytes exceed {LIMIT} (the launch fails)":
            static_shared + smem > LIMIT,
        "warps outside [1, 8]": (warps < 1) | (warps > CONST["rows_max_warps"]),
        "vec not in (0, 1, 2, 4, 8)": ~torch.isin(vec, torch.tensor(VECS)),
        "vector path on a misaligned bank or a row not made of 16-byte words":
            (vec > 0) & ((dims % elems != 0) | (not aligned)),
        "a lane holds more 16-byte words than vec": (vec > 0) & (words_per_lane > vec),
        "global fallback with a vector variant or dynamic shared memory": global_ & ((vec != 0) | (smem != 0)),
        "global fallback although one warp fits": global_ & (one_warp <= LIMIT - static_shared),
        "dynamic shared bytes differ from what the kernel indexes": ~global_ & (smem != needed),
    }
    out = []
    for reason, bad in checks.items():
        count = int(bad.sum())
        if count:
            out.append(f"{arch} {op} acc={acc} mem={mem} P+K={terms} aligned={aligned}: {reason}: "
                       f"D = {dims[bad][:8].tolist()}{' ...' if count > 8 else ''} ({count} D)")
    return out, (vec, warps, smem, global_)


def rows_slots(op, acc, mem, threads, shared, arch):
    """Resident block slots (blocks per SM times SMs) on each device running `arch` code; asserts
    >= 1 block per SM."""
    slots = []
    for device in (d for d in DEVICES if d.arch == arch):
        registers = _resource(rows_kernels(POLICIES[op][0], acc, mem), "registers", device.arch)
        blocks = occupancy(device, threads, shared, registers, LIMIT)
        assert blocks > 0, (f"{op} acc={acc} mem={mem}: no block of {threads} threads and {shared} "
                            f"shared bytes fits an SM of {device.name}")
        slots.append(blocks * device.sms)
    return slots


@pytest.mark.parametrize("op", sorted(POLICIES))
@pytest.mark.parametrize("acc", sorted(ACC))
def test_rows_plans_fit_every_d(op, acc):
    """Every D in 1..13000, every first warp count, every bank dtype, aligned banks or not."""
    failures = []
    for arch in TABLE["archs"]:
        planned = set()  # Half and BFloat16 plan alike unless their kernels differ
        for mem in MEM:
            static_shared = _resource(rows_kernels(POLICIES[op][0], acc, mem), "static_shared", arch)
            if (MEM[mem], static_shared) in planned:
                continue
            planned.add((MEM[mem], static_shared))
            for aligned in (True, False):
                for terms in TERMS if aligned else (2, 5, 17, 4097):
                    found, (_, warps, smem, _) = rows_violations(op, acc, mem, DIMS, terms, aligned,
                                                                 static_shared, arch)
                    failures += found
                    if not found:  # fewer blocks fit as shared memory grows: the largest per block size
                        largest = {}
                        for threads, dynamic in zip((warps * 32).tolist(), smem.tolist()):
                            largest[threads] = max(dynamic, largest.get(threads, 0))
                        for threads, dynamic in largest.items():
                            rows_slots(op, acc, mem, threads, static_shared + dynamic, arch)
    assert not failures, f"{len(failures)} kinds of plan break a limit:\n" + "\n".join(failures)


@pytest.mark.parametrize("op", sorted(POLICIES))
def test_rows_splits_fit_the_grid(op):
    dims = torch.tensor([1, 33, 128, 512, 1024, 2048, 3072, 4096, 6144, 12288])
    for acc, mem, arch in itertools.product(ACC, ("float", "BFloat16", "double"), TABLE["archs"]):
        static_shared = _resource(rows_kernels(POLICIES[op][0], acc, mem), "static_shared", arch)
        for terms in (1, 2, 5, 17, 100, 4097, 70000):
            vec, warps, smem, _ = plan_rows(op, acc, mem, dims, terms, True, static_shared)
            for v, w, s in set(zip(vec.tolist(), warps.tolist(), smem.tolist())):
                for slots in set(rows_slots(op, acc, mem, w * 32, static_shared + s, arch)):
                    for batch in BATCHES:
                        splits, per_split = _C._plan_rows_splits(v, w, batch, terms, slots)
                        assert 1 <= splits <= CONST["max_grid_y"]
                        assert per_split >= 1 and splits * per_split >= terms
                        assert (splits - 1) * per_split < terms, "an empty split"
                        assert batch <= CONST["max_grid_x"]


def test_rows_issue_cases():
    """The D and P + K of issue 20 that failed to launch now fit (or fall back to global memory)."""
    failures = []
    cases = (
        ("float", tuple(MEM), (1365, 1536, 2047, 2048, 2457, 3072, 4094, 4095, 4096, 6141, 6142, 6143, 6144)),
        ("double", ("double", "float", "BFloat16"), (681, 682, 683, 767, 768, 769, 1023, 1024, 1025, 1536, 2048,
                                                     3072)),
    )
    for (acc, mems, dims), arch in itertools.product(cases, TABLE["archs"]):
        for mem in mems:
            static_shared = _resource(rows_kernels("NcePolicy", acc, mem), "static_shared", arch)
            for terms in (2, 5, 17, 20, 25, 4097):
                failures += rows_violations("nce_memory_loss", acc, mem, torch.tensor(dims), terms, True,
                                            static_shared, arch)[0]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# memory_update_


def test_memory_update_plans_fit_every_d_and_batch():
    failures = []
    groups = {}  # (arch, static shared bytes, row bytes) -> kernels
    for x, mem, arch in itertools.product(X, MEM, TABLE["archs"]):
        name = f"memory_update_kernel<{x}, {mem}>"
        key = (arch, _resource([name], "static_shared", arch), 8 if mem == "double" else 4)
        groups.setdefault(key, []).append(name)
    for (arch, static_shared, row), names in groups.items():
        where = f"{arch} memory_update_ ({row}-byte row elements, {static_shared} static bytes)"
        for dim in range(1, 13001):
            plan = _C._plan_memory_update(1, dim, row, static_shared)
            threads, smem = plan["threads"], plan["smem"]
            if not 32 <= threads <= CONST["update_max_threads"] or threads % 32:
                failures.append(f"{where} D={dim}: {threads} threads")
            if plan["workspace"]:
                if smem != 0 or dim * row <= LIMIT - static_shared:
                    failures.append(f"{where} D={dim}: a global workspace although the row fits")
            elif smem != dim * row:
                failures.append(f"{where} D={dim}: {smem} dynamic bytes for a {dim * row}-byte row")
            if static_shared + smem > LIMIT:
                failures.append(f"{where} D={dim}: {static_shared} static + {smem} dynamic shared bytes "
                                f"exceed {LIMIT} (the launch fails)")
            elif dim % 64 == 0 or dim * row > LIMIT - static_shared - 64:
                for device in (d for d in DEVICES if d.arch == arch):
                    registers = _resource(names, "registers", arch)
                    if occupancy(device, threads, static_shared + smem, registers, LIMIT) < 1:
                        failures.append(f"{where} D={dim}: no block fits an SM of {device.name}")
        for batch in (1, 1025, 3000, 4096, 4097, 65536):
            plan = _C._plan_memory_update(batch, 128, row, static_shared)
            assert plan["sorted"] == (batch > CONST["update_scan_batch"]), batch
            assert batch <= CONST["max_grid_x"]
    assert not failures, f"{len(failures)} plans break a limit, e.g.:\n" + "\n".join(failures[:12])


def test_memory_update_issue_cases():
    """D in [11769, 12288] (fp32/bf16/fp16 banks) and [5881, 6144] (fp64) failed to launch (sm_80;
    more on sm_90)."""
    failures = []
    for (mem, dims), arch in itertools.product(
            (("float", range(11000, 12300)), ("BFloat16", range(11000, 12300)), ("double", range(5500, 6150))),
            TABLE["archs"]):
        static_shared = _resource([f"memory_update_kernel<float, {mem}>"], "static_shared", arch)
        row = 8 if mem == "double" else 4
        bad = []
        for dim in dims:
            plan = _C._plan_memory_update(64, dim, row, static_shared)
            if static_shared + plan["smem"] > LIMIT:
                bad.append(dim)
        if bad:
            failures.append(f"{arch} {mem} banks ({static_shared} static bytes): the launch fails at D in "
                            f"[{bad[0]}, {bad[-1]}] ({len(bad)} D)")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# cma_topk


@pytest.mark.parametrize("math_kind", range(4))
def test_cma_topk_shared_plans_fit_every_device(math_kind):
    name = f"cma_topk_kernel<(Math){math_kind}>"
    for device in DEVICES:
        static_shared = _resource([name], "static_shared", device.arch)
        registers = _resource([name], "registers", device.arch)
        for k in list(range(1, 300)) + [512, 1000, 4096, 50000]:
            plan = _C._plan_cma_topk(k, device.max_optin, static_shared)
            where = f"{name} k={k} on {device.name}"
            assert plan["ok"], where
            # The opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize) leaves room for the static part.
            assert plan["dynamic_limit"] + static_shared <= device.max_optin, where
            assert plan["smem"] <= plan["dynamic_limit"], where
            assert plan["capacity"] in (CONST["cma_max_candidates"], CONST["cma_max_candidates"] // 2)
            blocks = occupancy(device, CONST["cma_threads"], static_shared + plan["smem"], registers,
                               device.max_optin)
            assert blocks >= 1, where


def test_cma_topk_opt_in_subtracts_the_static_size():
    # A kernel with static shared memory must not be opted in to the whole per-block maximum.
    plan = _C._plan_cma_topk(32, 232448, 1024)
    assert plan["dynamic_limit"] == 232448 - 1024 and plan["smem"] + 1024 <= 232448
