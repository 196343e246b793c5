"""`avidfast demo` end to end at a toy size (the real size is `make demo`)."""
import json
import os

from avidfast.demo import DemoSettings, run_demo


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    settings = DemoSettings(out_dir=str(tmp_path / "demo"), videos=12, classes=3, seconds=2.0, epochs=1, held_out_videos=6,
                            progress=False)
    figures = run_demo(settings)
    out = capsys.readouterr().out
    assert "avidfast demo: what Cross-AVID learned" in out and "verdict:" in out
    for name in ("loss_curve.png", "results.json", "data/manifest.csv", "data/table5-stats.npz",
                 "train/checkpoints/last.pt", "train/metrics.csv"):
        assert os.path.isfile(tmp_path / "demo" / name), name
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert abs(saved["chance"] - 1 / 3) < 1e-9 and set(saved["memory_trained"]["mean"]) == {"video", "audio", "combined"}
    assert len(saved["memory_trained"]["top1"]["video"]) == 5  # five 70/30 splits
    for name in ("retrieval_trained", "retrieval_random"):  # recall on the held-out set (seed + 1)
        assert saved[name]["num_queries"] == 6 and 0 <= saved[name]["v2a"]["R@1"] <= 1
    assert "retrieval recall@1 on 6 held-out videos" in out
    assert 0 <= figures["linear_trained"]["video_top1"][figures["linear_trained"]["best_block"]] <= 1
    mtime = os.path.getmtime(tmp_path / "demo" / "train" / "checkpoints" / "last.pt")
    run_demo(settings)  # a finished run is reused, not retrained
    assert os.path.getmtime(tmp_path / "demo" / "train" / "checkpoints" / "last.pt") == mtime
    assert "reusing the finished run" in (tmp_path / "demo" / "train.log").read_text()
    # a finished run trained otherwise is never silently reused (nor overwritten)
    import dataclasses

    import pytest

    from avidfast.config import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        run_demo(dataclasses.replace(settings, overrides=["optim.lr=2e-3"]))
    assert os.path.getmtime(tmp_path / "demo" / "train" / "checkpoints" / "last.pt") == mtime
