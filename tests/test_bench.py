"""The benchmark harness: baselines compute what ours computes, and the measurements are real."""
import json
import subprocess
import sys

import pytest
import torch

from avidfast.bench.baselines import AliasSampler, GatherCrossAVID, gather_memory_update_
from avidfast.bench.cma_suite import CASES as CMA_CASES
from avidfast.bench.cma_suite import CMABenchConfig
from avidfast.bench.ops_suite import CASES as OPS_CASES
from avidfast.bench.ops_suite import OpsBenchConfig
from avidfast.bench.suite import run_suite
from avidfast.bench.timing import peak_extra_memory, time_interleaved
from avidfast.cli import main
from avidfast.losses import AVIDLoss
from avidfast.ops import memory_update_, sample_negatives


def test_baseline_step_computes_the_same_loss_and_gradients_as_avid_loss():
    ours = AVIDLoss(300, dim=16, num_negatives=40, seed=3)
    baseline = GatherCrossAVID(ours.video_memory.memory.clone(), ours.audio_memory.memory.clone(), 40)
    for step in range(3):
        video = torch.randn(10, 16, requires_grad=True)
        audio = torch.randn(10, 16, requires_grad=True)
        index = torch.randperm(300)[:10]
        negatives = sample_negatives(index, 300, 40, 3, step)
        loss, _ = ours(video, audio, index)
        loss.backward()
        video_b, audio_b = video.detach().clone().requires_grad_(), audio.detach().clone().requires_grad_()
        base_loss, v, a = baseline.loss(video_b, audio_b, index, torch.cat([index[:, None], negatives], 1))
        base_loss.backward()
        baseline.update(index, v.detach(), a.detach())
        torch.testing.assert_close(loss.detach(), base_loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(video.grad, video_b.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.audio_memory.memory, baseline.audio_memory, rtol=1e-6, atol=1e-6)


def test_gather_update_matches_memory_update():
    memory = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    index, x = torch.randperm(50)[:10], torch.randn(10, 8)
    ours, base = memory.clone(), memory.clone()
    memory_update_(ours, index, x, 0.5)
    gather_memory_update_(base, index, x, 0.5)
    torch.testing.assert_close(ours, base)


def test_alias_sampler_follows_its_weights():
    weights = torch.tensor([1.0, 2.0, 0.0, 5.0])
    draws = AliasSampler(weights).draw(80_000)
    frequencies = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(frequencies, weights.double() / weights.sum(), atol=0.01, rtol=0)


def test_peak_extra_memory_sees_a_known_allocation():
    def allocate_8_mb():
        a = torch.ones(2 * 2**20)  # 8 MiB
        b = a + 1  # another 8 MiB at the peak
        return float(b[0])

    peak = peak_extra_memory(allocate_8_mb, torch.device("cpu"))
    assert 16 * 2**20 <= peak < 17 * 2**20


def test_time_interleaved_runs_every_variant_every_round():
    calls = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 4, 1, torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(t) == 4 and min(t) >= 0 for t in times.values())


def test_suite_runs_every_case_on_small_sizes():
    cfg = OpsBenchConfig(num_items=2000, batch=8, negatives=32, dim=16, rounds=2, warmup=1)
    results = run_suite(OPS_CASES, cfg)
    assert [r.name for r in results] == ["cross_avid_step", "memory_update", "sample_negatives"]
    step = results[0]
    # The baseline gathers (B, K + 1, D) float32 rows per bank; ours never does.
    gathered = 2 * cfg.batch * (cfg.negatives + 1) * cfg.dim * 4
    assert step.measurements["baseline"].peak_extra_bytes >= gathered
    assert step.ours.peak_extra_bytes < gathered
    assert all(r.speedup("baseline") > 0 for r in results)


def test_cma_baselines_mine_what_cma_topk_mines():
    from avidfast.bench.baselines import sixteen_query_topk
    from avidfast.ops import cma_topk

    cfg = CMABenchConfig(num_items=700, dim=32, k=9, queries=50)
    case = CMA_CASES["cma_mining_float32"](cfg, torch.device("cpu"))
    assert set(case.variants) == {"ours", "sixteen_query", "bare_matmul"}
    g = torch.Generator().manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(700, 32, generator=g), dim=1)
    audio = torch.nn.functional.normalize(torch.randn(700, 32, generator=g), dim=1)
    queries = torch.arange(0, 700, 7)
    _, ours = cma_topk(video, audio, 9, "consensus", queries)
    assert torch.equal(sixteen_query_topk(video, audio, 9, "consensus", queries).sort(dim=1).values,
                       ours.sort(dim=1).values)
    results = run_suite(CMA_CASES, CMABenchConfig(num_items=3000, dim=32, k=8, queries=256, rounds=1, warmup=0))
    assert [r.baselines for r in results] == [["sixteen_query", "bare_matmul"]] * 2


def test_cli_bench_ops_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "ops", "--num-items", "3000", "--batch", "8", "--negatives", "64", "--dim", "16",
                 "--rounds", "2", "--warmup", "0", "--case", "cross_avid_step", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cross_avid_step" in printed and "speed-up" in printed
    payload = json.loads(out.read_text())
    assert payload["results"][0]["case"] == "cross_avid_step" and payload["results"][0]["speedup"]["baseline"] > 0


def test_cli_bench_cma_extrapolates_to_all_queries(capsys):
    code = main(["bench", "cma", "--num-items", "2000", "--dim", "16", "--k", "4", "--queries", "200",
                 "--rounds", "1", "--warmup", "0", "--case", "cma_mining_float32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "extrapolated s" in printed and "sixteen_query" in printed and "bare_matmul" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "ops", "--case", "nope"], "--case nope: unknown case"),
        (["bench", "ops", "--num-items", "100", "--negatives", "99"], "--negatives 99 must be smaller"),
        (["bench", "cma", "--num-items", "100", "--k", "99"], "--k 99 must be smaller"),
    ],
)
def test_cli_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_help_lists_defaults():
    out = subprocess.run([sys.executable, "-m", "avidfast.cli", "bench", "ops", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--num-items" in out and "default: 500000" in out


def test_migration_suite_runs_every_case_on_small_sizes(tmp_path, capsys):
    from avidfast.bench.migration_suite import CASES as MIGRATION_CASES

    cfg = OpsBenchConfig(num_items=2000, batch=8, negatives=32, dim=16, rounds=2, warmup=1)
    results = run_suite(MIGRATION_CASES, cfg)
    assert [r.name for r in results] == ["lemniscate_nce", "npid_infonce", "cmc_two_view", "lemniscate_softmax"]
    for result in results:
        assert set(result.measurements) == {"ours", "peer"}
        assert all(len(m.times) == 2 for m in result.measurements.values())
    # The peers gather (B, K + 1, D) float32 rows; ours does not.
    assert results[0].measurements["peer"].peak_extra_bytes >= cfg.batch * (cfg.negatives + 1) * cfg.dim * 4
    code = main(["bench", "migration", "--num-items", "2000", "--batch", "8", "--negatives", "32", "--dim", "16",
                 "--rounds", "1", "--warmup", "0", "--case", "lemniscate_nce", "--json", str(tmp_path / "m.json")])
    assert code == 0
    payload = json.loads((tmp_path / "m.json").read_text())
    assert [r["case"] for r in payload["results"]] == ["lemniscate_nce"]
    assert "peer" in payload["results"][0]["speedup"]


def test_loader_bench_times_each_decoder_against_the_baseline_on_other_files(tmp_path, capsys):
    """`bench loader`: ours on MANIFEST (each decoder), the baseline on --baseline-manifest, and
    the per-stage times; on tiny synthetic clips (the figures mean nothing here, the plumbing does)."""
    from avidfast.data.prepare import prepare
    from avidfast.data.synthetic import make_dataset
    from avidfast.data.torchcodec_video import torchcodec_error

    originals = make_dataset(str(tmp_path / "syn"), 4, 2, seconds=2.0, seed=1, size=(96, 64))
    copies = prepare(originals, str(tmp_path / "small"), workers=0, transcode="h264", extract_audio="wav",
                     short_side=32, min_seconds=1.0, progress=False).manifest_path
    decoders = ["pyav"] + (["torchcodec"] if torchcodec_error() is None else [])
    out = tmp_path / "loader.json"
    args = ["bench", "loader", copies, "--baseline-manifest", originals, "--workers", "1", "--batch", "2",
            "--clips", "2", "--rounds", "1", "--frames", "4", "--crop", "16", "--stages", "1", "--json", str(out)]
    for decoder in decoders:
        args += ["--decoder", decoder]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    names = [r["variant"] for r in result["results"]]
    assert names == ["ours"] + [f"ours-{d}" for d in decoders[1:]] + ["reference-shaped"]
    assert all(r["median"] > 0 for r in result["results"])
    stages = {row["loader"]: row for row in result["stages_ms_per_clip"]}
    assert set(stages) == {f"ours ({d})" for d in decoders} | {"reference-shaped"}
    assert all(row[stage] > 0 for row in stages.values() for stage in ("decode", "augment", "audio read",
                                                                        "spectrogram"))
    assert "on the baseline files" in printed and "decode" in printed
