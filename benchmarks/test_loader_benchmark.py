"""Data-pipeline throughput on real clips (Big Buck Bunny, 720p H.264 + AAC): our CPU pipeline
against the reference-shaped loader, same files and worker count, on the raw clips and on their
`avidfast prepare --transcode h264 --extract-audio wav` copies; DALI's CPU mode on VP9 copies.

Needs the real-media cache (`make media`, or `python scripts/fetch_media.py --clips 16`); the
prepared copies are cached beside it. Prints the tables that BENCHMARKS.md records.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import media  # noqa: E402

from avidfast.bench.loader_suite import LoaderBenchConfig, format_loader_table, run_loader_benchmark  # noqa: E402
from avidfast.bench.report import describe_machine  # noqa: E402
from avidfast.data.manifest import read_manifest  # noqa: E402
from avidfast.data.prepare import prepare  # noqa: E402

CLIPS = 16


@pytest.fixture(scope="module")
def raw_manifest():
    path = media.real_clips(CLIPS, 10.0)
    if path is None:
        pytest.skip("real media is not in the cache: run `python scripts/fetch_media.py --clips 16`")
    return path


def _prepared(raw: str, transcode: str, short_side=None) -> str:
    out = os.path.join(os.path.dirname(raw) + f"_{transcode}" + (f"_{short_side}" if short_side else ""))
    return prepare(raw, out, transcode=transcode, extract_audio="wav", short_side=short_side, workers=2,
                   progress=False).manifest_path


def test_short_side_copies_against_reference_shaped_loader_on_the_originals(raw_manifest, capsys):
    """Ours (PyAV and torchcodec where it loads) on `--short-side 128` H.264 copies, the baseline
    on the original clips, DALI's CPU mode on `--short-side 128` VP9 copies (issue 17's goals:
    >= 4x and >= 1x)."""
    from avidfast.data.torchcodec_video import torchcodec_error

    dali = None
    try:
        import nvidia.dali  # noqa: F401

        dali = read_manifest(_prepared(raw_manifest, "vp9", 128))
    except ImportError:
        pass
    decoders = ("pyav",) + (("torchcodec",) if torchcodec_error() is None else ())
    cfg = LoaderBenchConfig(clips=32, rounds=5, decoders=decoders)
    results = run_loader_benchmark(read_manifest(_prepared(raw_manifest, "h264", 128)), cfg, dali_manifest=dali,
                                   baseline_manifest=read_manifest(raw_manifest))
    with capsys.disabled():
        print("\n" + format_loader_table(results, cfg, describe_machine("cpu"), f"short side 128 vs {raw_manifest}"))
    base = next(r for r in results if r.name == "reference-shaped")
    assert max(r.median for r in results if r.name.startswith("ours")) > base.median


@pytest.mark.parametrize("files", ["raw", "prepared"])
def test_cpu_pipeline_against_reference_shaped_loader(raw_manifest, files, capsys):
    path = raw_manifest if files == "raw" else _prepared(raw_manifest, "h264")
    dali = None
    if files == "prepared":
        try:
            import nvidia.dali  # noqa: F401

            dali = read_manifest(_prepared(raw_manifest, "vp9"))
        except ImportError:
            pass
    cfg = LoaderBenchConfig(clips=48, rounds=5)
    results = run_loader_benchmark(read_manifest(path), cfg, dali_manifest=dali)
    with capsys.disabled():
        print("\n" + format_loader_table(results, cfg, describe_machine("cpu"), f"{files}: {path}"))
    ours, base = results[0], results[1]
    assert ours.median > base.median
