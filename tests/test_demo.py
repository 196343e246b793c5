"""`avidfast demo` end to end at a toy size (the real size is `make demo`), its verdict, and the
README's demo blocks against docs/demo_results.json."""
import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest

from avidfast.config import ConfigError
from avidfast.demo import DemoSettings, run_demo
from avidfast.demo.report import goals, readme_with_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    settings = DemoSettings(out_dir=str(out), videos=12, classes=3, seconds=2.0, epochs=1, held_out_videos=9,
                            progress=False)
    return settings, run_demo(settings)


def test_demo_runs_end_to_end_and_reuses_its_work(toy, capsys):
    settings, figures = toy
    out = Path(settings.out_dir)
    for name in ("loss_curve.png", "retrieval_grid.png", "similarity_matrix.png", "results.json", "data/manifest.csv",
                 "held_out/manifest.csv", "data/table5-stats.npz", "train/checkpoints/last.pt", "train/metrics.csv"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert abs(saved["chance"] - 1 / 3) < 1e-9
    assert set(saved["memory_trained"]["mean"]) == {"video", "audio", "combined"}
    for net in ("trained", "random"):  # every held-out figure is measured on the 9 held-out videos
        assert saved[f"instance_{net}"]["num_queries"] == 9 and saved[f"class_{net}"]["num_queries"] == 9
        assert saved[f"linear_{net}"]["num_test_videos"] == 9 and saved[f"linear_{net}"]["num_train"] == 24
        low, high = saved[f"class_{net}"]["interval"]["v2a"]
        assert low <= saved[f"class_{net}"]["v2a"] <= high
    mtime = os.path.getmtime(out / "train" / "checkpoints" / "last.pt")
    again = run_demo(settings)  # a finished run is reused, not retrained, and measures the same
    assert os.path.getmtime(out / "train" / "checkpoints" / "last.pt") == mtime
    assert "reusing the finished run" in (out / "train.log").read_text()
    assert again["goals"] == figures["goals"] and again["instance_trained"] == figures["instance_trained"]
    printed = capsys.readouterr().out
    assert "on 9 held-out clips" in printed and "verdict:" in printed and "random network" in printed
    # a finished run trained otherwise is never silently reused (nor overwritten)
    with pytest.raises(ConfigError, match="other settings"):
        run_demo(dataclasses.replace(settings, overrides=["optim.lr=2e-3"]))
    assert os.path.getmtime(out / "train" / "checkpoints" / "last.pt") == mtime


def test_verdict_is_judged_against_the_random_network(toy):
    _, figures = toy
    # the toy run's verdict is its goals' conjunction, each cross-modal goal against the random network
    assert figures["verdict"] == all(g["passed"] for g in figures["goals"]) and len(figures["goals"]) == 5
    for g in figures["goals"][:4]:
        assert g["random_interval"] is not None
        assert g["passed"] == (g["value"] >= g["times"] * g["chance"] and g["interval"][0] > g["random_interval"][1])
    # with 3 classes a linear probe cannot reach 4x chance, so the toy verdict must say so
    assert not figures["verdict"]
    # the random network judged as if trained fails every cross-modal goal (its intervals overlap its own)
    as_random = copy.deepcopy(figures)
    for kind in ("instance", "class", "linear"):
        as_random[f"{kind}_trained"] = copy.deepcopy(figures[f"{kind}_random"])
    assert not any(g["passed"] for g in goals(as_random)[:4])
    # perfect figures on 9 clips pass; the same figures pass no cross-modal goal when the random
    # network's interval reaches above the trained network's low end
    perfect = copy.deepcopy(figures)
    perfect["class_trained"].update(v2a=1.0, a2v=1.0, interval={"v2a": [0.7, 1.0], "a2v": [0.7, 1.0]})
    for key in ("v2a", "a2v"):
        perfect["instance_trained"][key]["R@5"] = 1.0
        perfect["instance_trained"]["interval"][key]["R@5"] = [0.7, 1.0]
    perfect["linear_trained"].update(held_out_top1=1.0, chance=0.2, interval=[0.7, 1.0])
    for key in ("v2a", "a2v"):
        perfect["instance_random"]["interval"][key]["R@5"] = [0.0, 0.3]
        perfect["class_random"]["interval"][key] = [0.0, 0.3]
    perfect["instance_trained"]["chance"]["R@5"], perfect["class_trained"]["chance"] = 0.1, 0.1
    assert all(g["passed"] for g in goals(perfect))
    for key in ("v2a", "a2v"):
        perfect["class_random"]["interval"][key] = [0.2, 0.75]
    assert [g["passed"] for g in goals(perfect)] == [False, False, True, True, True]


def test_readme_demo_blocks_are_rendered_from_the_quoted_results():
    quoted = ROOT / "docs" / "demo_results.json"
    if not quoted.is_file():
        pytest.skip("docs/demo_results.json is not here (tests run against an installed package)")
    readme = (ROOT / "README.md").read_text()
    figures = json.loads(quoted.read_text())
    assert readme_with_demo(readme, figures) == readme, "run scripts/readme_demo_table.py"
    assert figures["verdict"] == all(g["passed"] for g in goals(figures))  # the quoted verdict is the goals'
    with pytest.raises(ValueError, match="demo-table"):
        readme_with_demo(readme.replace("<!-- /demo-table -->", ""), figures)
