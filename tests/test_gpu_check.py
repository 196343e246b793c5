"""scripts/gpu_check.py (`make gpu-check`) where there is no GPU: the "no GPU" branch with the real
detection, the subprocess runner, the step plan and the atomic Markdown report.

The script lives in the source tree (scripts/), not in the package: these tests skip when it is
absent, e.g. when they run against an installed wheel.
"""
import ast
import importlib.util
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
if not SCRIPT.is_file():
    pytest.skip(f"{SCRIPT} is absent (tests running against an installed wheel without the source tree's "
                "scripts/ folder)", allow_module_level=True)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _path_without_nvidia_smi() -> str:
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "nvidia-smi")))


def _fake_nvidia_smi(folder: Path, script: str) -> str:
    """A PATH whose first folder holds an `nvidia-smi` shell script, the real one removed."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(folder) + os.pathsep + _path_without_nvidia_smi()


def _run_script(args, cwd: Path, path: str, timeout: float = 120):
    env = dict(os.environ, PATH=path, COLUMNS="200")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _assert_no_gpu_line(result, cwd: Path, expected: str) -> None:
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: no NVIDIA GPU visible"), lines[0]
    assert expected in lines[0]
    assert lines[0].endswith("nothing to do")
    assert sorted(os.listdir(cwd)) == [], "no report (nor a temporary file) may be written without a GPU"


# ------------------------------------------------------------------------------------- no GPU


def test_without_nvidia_smi_prints_one_line_and_writes_nothing(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = _run_script(["--report", str(cwd / "gpu-report.md")], cwd, _path_without_nvidia_smi())
    _assert_no_gpu_line(result, cwd, "nvidia-smi not found")


def test_nvidia_smi_finding_no_device_prints_one_line(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    path = _fake_nvidia_smi(tmp_path / "bin", 'echo "No devices were found"\nexit 6\n')
    result = _run_script([], cwd, path)  # default --report gpu-report.md in cwd
    _assert_no_gpu_line(result, cwd, "nvidia-smi -L lists no GPU")


def test_gpu_listed_but_torch_without_cuda_prints_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here: the script would run the whole GPU check")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    path = _fake_nvidia_smi(tmp_path / "bin", 'echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000)"\n')
    result = _run_script(["--python", sys.executable], cwd, path)
    _assert_no_gpu_line(result, cwd, "torch.cuda.is_available() is False")


def test_detect_gpu_without_nvidia_smi(gpu_check):
    gpu = gpu_check.detect_gpu(sys.executable, dict(os.environ, PATH=_path_without_nvidia_smi()))
    assert not gpu.available
    assert gpu.reason == "nvidia-smi not found on PATH"
    assert gpu_check.no_gpu_message(gpu).count("\n") == 0


# --------------------------------------------------------------------------------------- help


def test_help_lists_options_with_defaults(tmp_path):
    result = _run_script(["--help"], tmp_path, os.environ.get("PATH", ""))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for option in ("--report", "--python", "--skip", "--budget-seconds", "--no-build"):
        assert option in text
    assert "default: gpu-report.md" in text
    assert "default: 600" in text
    assert f"default: {sys.executable}" in text
    for step in ("build", "cuda-tests", "sanitizer", "sync-checks", "bench-ops", "cma-topk", "loader",
                 "bench-train", "avid-run"):
        assert step in text
    assert os.listdir(tmp_path) == []


def test_unknown_skip_is_refused(tmp_path):
    result = _run_script(["--skip", "nonsense"], tmp_path, _path_without_nvidia_smi())
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_script_imports_only_the_standard_library_at_top_level():
    tree = ast.parse(SCRIPT.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names, "no imports found"
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


# --------------------------------------------------------------------------------- subprocesses


def test_run_step_passes_and_keeps_stdout(gpu_check):
    step = gpu_check.run_step("ok", [sys.executable, "-c", "print('x'); print('table row')"], 60, title="OK step")
    assert step.status == gpu_check.PASSED and not step.failed
    assert step.commands[0].returncode == 0
    assert any("table row" in text for _, text in step.blocks)
    assert step.timeout == 60 and step.seconds > 0
    assert step.status_line() == "passed"


def test_run_step_failure_records_tail_of_output(gpu_check):
    code = "import sys; print('partial output'); print('boom', file=sys.stderr); sys.exit(3)"
    step = gpu_check.run_step("bad", [sys.executable, "-c", code], 60)
    assert step.status == gpu_check.FAILED and step.failed
    assert "exited with status 3" in step.reason
    texts = "\n".join(text for _, text in step.blocks)
    assert "boom" in texts and "partial output" in texts
    assert step.status_line().startswith("FAILED: ")


def test_run_step_stops_at_the_first_failing_command(gpu_check):
    commands = [[sys.executable, "-c", "print('one')"], [sys.executable, "-c", "raise SystemExit(1)"],
                [sys.executable, "-c", "print('never')"]]
    step = gpu_check.run_step("several", commands, 60)
    assert step.failed
    assert len(step.commands) == 2
    assert all("never" not in text for _, text in step.blocks)


def test_run_step_times_out(gpu_check):
    started = time.monotonic()
    step = gpu_check.run_step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1.0)
    assert time.monotonic() - started < 20
    assert step.failed
    assert "timed out" in step.reason
    assert step.commands[0].timed_out


def test_run_step_with_a_missing_program(gpu_check):
    step = gpu_check.run_step("missing", ["/nonexistent/program-for-gpu-check"], 10)
    assert step.failed
    assert step.commands[0].returncode is None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to inspect the child process")
def test_timeout_kills_the_whole_process_group(gpu_check, tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(120)\n")
    result = gpu_check.run_command([sys.executable, "-c", code], 3.0)
    assert result.timed_out
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # gone
        if state in ("Z", "X"):
            break  # dead, not yet reaped by its new parent
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the grandchild outlived the timeout")


def test_soft_timeout_sends_sigterm_first(gpu_check):
    code = ("import signal, sys, time\n"
            "def stop(*_):\n"
            "    print('saved a checkpoint', flush=True)\n"
            "    sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    result = gpu_check.run_command([sys.executable, "-c", code], 30, soft_timeout=1.5, grace=20)
    assert result.stopped and not result.timed_out
    assert result.returncode == 143
    assert "saved a checkpoint" in result.stdout
    assert result.seconds < 15


def test_soft_timeout_kills_after_the_grace_period(gpu_check):
    code = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "time.sleep(60)\n")
    started = time.monotonic()
    result = gpu_check.run_command([sys.executable, "-c", code], 30, soft_timeout=1.0, grace=1.0)
    assert result.stopped and result.timed_out
    assert time.monotonic() - started < 15


# -------------------------------------------------------------------------------------- report


MACHINE = {
    "GPU": "NVIDIA H200 (driver 570.124.06, 143771 MiB)",
    "compute capability": "9.0",
    "CUDA": "nvcc: Cuda compilation tools, release 13.0, V13.0.48; torch built with CUDA 13.0",
    "torch": "2.11.0+cu130",
    "Python": "3.12.3 (/usr/bin/python3)",
    "CPU": "Intel(R) Xeon(R) Platinum 8480+, 16 logical CPUs",
    "date": "2026-12-01 10:00 UTC",
    "commit": "0123456789abcdef",
}


def _results(gpu_check):
    table = "case  variant  median ms\n----  -------  ---------\nstep  ours     1.000\n```\nnot a fence"
    passed = gpu_check.StepResult("bench-ops", "Memory-bank operators", gpu_check.PASSED, 12.5, 35,
                                  blocks=[("`avidfast bench ops`", table)], notes=["a note"])
    failed = gpu_check.run_step("cuda-tests", [sys.executable, "-c", "raise SystemExit('3 failed')"], 30,
                                title="CUDA tests")
    skipped = gpu_check.StepResult("loader", "Data pipeline", gpu_check.SKIPPED,
                                   reason="nvidia-dali-cuda130 not installed")
    return [passed, failed, skipped]


def test_report_holds_header_status_lines_and_figures(gpu_check, tmp_path):
    path = tmp_path / "out" / "gpu-report.md"
    written = gpu_check.write_report(path, MACHINE, _results(gpu_check), elapsed=42.0)
    assert Path(written) == path
    text = path.read_text()
    assert text.startswith("## GPU check: NVIDIA H200, 2026-12-01 10:00 UTC")
    for key, value in MACHINE.items():
        assert f"| {key} | {value} |" in text
    assert "| 1. Memory-bank operators (`bench-ops`) | passed | 12.5 | 35 |" in text
    assert "| 2. CUDA tests (`cuda-tests`) | FAILED: " in text
    assert "| 3. Data pipeline (`loader`) | skipped: nvidia-dali-cuda130 not installed | - | - |" in text
    assert "**Result: 1 step(s) FAILED** (cuda-tests); 1 passed, 1 skipped; total 42 s." in text
    assert "### 1. Memory-bank operators" in text and "### 3. Data pipeline" in text
    assert "step  ours     1.000" in text  # figures verbatim
    assert "````\ncase  variant" in text  # a longer fence around text holding ```
    assert "3 failed" in text  # the tail of the failing command
    assert "- a note" in text
    assert os.listdir(path.parent) == ["gpu-report.md"], "no temporary file may be left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


def test_report_lists_steps_not_run_yet(gpu_check, tmp_path):
    path = tmp_path / "gpu-report.md"
    gpu_check.write_report(path, MACHINE, _results(gpu_check)[:1], pending=["cma-topk", "avid-run"])
    text = path.read_text()
    assert "| 2. `cma-topk` | not run yet | - | - |" in text
    assert "| 3. `avid-run` | not run yet | - | - |" in text
    assert "2 not run yet" in text


def test_report_is_replaced_atomically(gpu_check, tmp_path, monkeypatch):
    path = tmp_path / "gpu-report.md"
    path.write_text("previous report\n")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(gpu_check.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        gpu_check.write_report(path, MACHINE, _results(gpu_check))
    assert path.read_text() == "previous report\n"
    assert os.listdir(tmp_path) == ["gpu-report.md"]
    monkeypatch.undo()
    gpu_check.write_report(path, MACHINE, _results(gpu_check))
    assert path.read_text().startswith("## GPU check")
    assert os.listdir(tmp_path) == ["gpu-report.md"]


# ---------------------------------------------------------------------------------------- plan


def test_steps_fit_the_default_budget_in_the_issue_order(gpu_check):
    assert gpu_check.STEP_NAMES == ["build", "cuda-tests", "sanitizer", "sync-checks", "bench-ops", "cma-topk",
                                    "loader", "bench-train", "avid-run"]
    assert sum(step.timeout for step in gpu_check.STEPS) <= gpu_check.DEFAULT_BUDGET == 600
    assert all(step.timeout > 0 for step in gpu_check.STEPS)


def test_docstring_states_the_timeouts_of_the_plan(gpu_check):
    stated = " ".join(gpu_check.__doc__.split())
    for step in gpu_check.STEPS:
        assert f"{step.name} {step.timeout:g}" in stated, step.name


def test_allot_extends_only_into_unreserved_time(gpu_check):
    step = gpu_check.Step("x", "X", 100, lambda ctx, timeout: None, extend_to=200)
    assert gpu_check.allot(step, 1.0, remaining=480, reserved_later=380) == 100
    assert gpu_check.allot(step, 1.0, remaining=480, reserved_later=100) == 200
    assert gpu_check.allot(step, 1.0, remaining=480, reserved_later=300) == 180
    assert gpu_check.allot(step, 2.0, remaining=960, reserved_later=0) == 400
    assert gpu_check.allot(step, 1.0, remaining=50, reserved_later=100) == 0


def _fake_context(gpu_check, tmp_path, modules):
    gpu = gpu_check.GPUInfo(True, probe={"torch": "2.11.0+cu130", "modules": modules,
                                         "devices": [{"name": "NVIDIA H200", "capability": "9.0"}]})
    return gpu_check.Context(sys.executable, tmp_path, dict(os.environ), gpu, 16)


def test_run_checks_skips_fails_and_carries_on(gpu_check, tmp_path):
    seen = {}

    def ok(ctx, timeout):
        seen.setdefault("timeouts", []).append(timeout)
        return gpu_check.StepResult("ok", "OK", gpu_check.PASSED, 0.1)

    def broken(ctx, timeout):
        raise RuntimeError("bug in a step")

    steps = [
        gpu_check.Step("first", "First", 100, ok, needs=(), needs_avidfast=False),
        gpu_check.Step("dali", "Needs DALI", 100, ok, needs=("nvidia.dali",), needs_avidfast=False),
        gpu_check.Step("broken", "Broken", 100, broken, needs=(), needs_avidfast=False),
        gpu_check.Step("skipped", "Skipped", 100, ok, needs=(), needs_avidfast=False),
        gpu_check.Step("last", "Last", 100, ok, needs=("numpy",), needs_avidfast=False, extend_to=300),
    ]
    ctx = _fake_context(gpu_check, tmp_path, {"nvidia.dali": False, "numpy": True})
    progress = []
    results = gpu_check.run_checks(ctx, steps, ["skipped"], 500, time.monotonic() + 500,
                                   on_progress=lambda results, pending: progress.append((len(results), list(pending))),
                                   echo=lambda line: None)
    assert [r.status for r in results] == ["passed", "skipped", "FAILED", "skipped", "passed"]
    assert results[1].reason == "nvidia-dali-cuda130 not installed"
    assert "bug in a step" in results[2].reason
    assert results[3].reason == "--skip skipped"
    first, last = seen["timeouts"]
    assert first == pytest.approx(100 * 500 / gpu_check.DEFAULT_BUDGET)
    assert last > 200  # the skipped steps' time went to the extendable last step
    assert progress[0] == (0, ["first", "dali", "broken", "skipped", "last"])
    assert progress[-1] == (5, [])


def test_steps_needing_avidfast_skip_after_a_failed_build(gpu_check, tmp_path):
    def failed_build(ctx, timeout):
        ctx.install_checked = True
        return gpu_check.StepResult("build", "Build", gpu_check.FAILED, 1.0, reason="nvcc error")

    steps = [gpu_check.Step("build", "Build", 100, failed_build, needs=(), needs_avidfast=False),
             gpu_check.Step("bench", "Bench", 100, lambda ctx, t: pytest.fail("must not run"), needs=())]
    ctx = _fake_context(gpu_check, tmp_path, {})
    results = gpu_check.run_checks(ctx, steps, [], 480, time.monotonic() + 480, echo=lambda line: None)
    assert [r.status for r in results] == ["FAILED", "skipped"]
    assert "not installed" in results[1].reason


def test_main_writes_the_report_and_exits_non_zero_on_a_failure(gpu_check, tmp_path, monkeypatch, capsys):
    gpu = gpu_check.GPUInfo(True, probe={"torch": "2.11.0+cu130", "modules": {},
                                         "devices": [{"name": "NVIDIA H200", "capability": "9.0"}]})
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda python, env: gpu)
    monkeypatch.setattr(gpu_check, "machine_info", lambda gpu, python, env, budget: dict(MACHINE))
    outcome = {"status": gpu_check.FAILED}

    def step(ctx, timeout):
        return gpu_check.StepResult("only", "Only step", outcome["status"], 0.5, reason="it broke")

    monkeypatch.setattr(gpu_check, "STEPS", [gpu_check.Step("only", "Only step", 10, step, needs=(),
                                                            needs_avidfast=False)])
    report = tmp_path / "gpu-report.md"
    assert gpu_check.main(["--report", str(report), "--work-dir", str(tmp_path / "work")]) == 1
    assert "FAILED: it broke" in report.read_text()
    outcome["status"] = gpu_check.PASSED
    assert gpu_check.main(["--report", str(report)]) == 0
    assert "**Result: no step failed**" in report.read_text()
    assert sorted(os.listdir(tmp_path)) == ["gpu-report.md", "work"]
    assert "report:" in capsys.readouterr().out


# --------------------------------------------------------------------------------- step helpers


def test_loss_fell(gpu_check):
    falling = [5.0 - 0.01 * i for i in range(100)]
    ok, summary = gpu_check.loss_fell(falling)
    assert ok and "fell" in summary and "100 steps" in summary
    ok, summary = gpu_check.loss_fell(falling[::-1])
    assert not ok and "did NOT fall" in summary
    ok, summary = gpu_check.loss_fell([5.0, 4.0, 3.0])
    assert not ok and "only 3 logged steps" in summary


def test_metrics_and_curve_table(gpu_check, tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,epoch,loss,lr,clips_per_s\n" + "".join(
        f"{i},{1 + i // 10},{5 - i / 100:.6f},0.001,{100 + i}\n" for i in range(1, 31)))
    rows = gpu_check.read_metrics(path)
    assert len(rows) == 30 and rows[0]["loss"] == pytest.approx(4.99)
    table = gpu_check.curve_table(rows).splitlines()
    assert table[0].split() == ["step", "epoch", "loss", "clips/s"]
    assert table[1].split()[0] == "1" and table[-1].split()[0] == "30"


def test_cuda_test_files_are_the_marked_ones(gpu_check):
    names = [p.name for p in gpu_check.cuda_test_files()]
    assert "test_ops_cuda.py" in names and "test_cma_topk_cuda.py" in names
    assert "test_gpu_check.py" not in names


def test_big_buck_bunny_lookup(gpu_check, tmp_path):
    env = {"AVIDFAST_MEDIA_CACHE": str(tmp_path)}
    manifest, can_cut, why = gpu_check.find_bbb(env)
    assert manifest is None and not can_cut and str(tmp_path) in why
    (tmp_path / "bbb.mp4").write_bytes(b"")
    assert gpu_check.find_bbb(env)[:2] == (None, True)
    clips = tmp_path / "bbb_clips_3x10s"
    clips.mkdir()
    (clips / "manifest.csv").write_text("path\nclip_00.mp4\n")
    assert gpu_check.find_bbb(env)[0] == clips / "manifest.csv"


def test_sanitizer_step_skips_without_compute_sanitizer(gpu_check, tmp_path):
    ctx = _fake_context(gpu_check, tmp_path, {})
    ctx.env = dict(ctx.env, PATH=str(tmp_path / "bin"), CUDA_HOME=str(tmp_path / "no-cuda"))
    result = gpu_check.step_sanitizer(ctx, 60)
    assert result.status == gpu_check.SKIPPED
    assert result.reason.startswith("compute-sanitizer not found")


def test_sanitizer_step_runs_every_tool_on_the_cases(gpu_check, tmp_path):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    tool = home / "bin" / "compute-sanitizer"
    tool.write_text('#!/bin/sh\necho "sanitizer $2 ${PYTORCH_NO_CUDA_MEMORY_CACHING}: $6"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    ctx = _fake_context(gpu_check, tmp_path, {})
    ctx.env = dict(ctx.env, CUDA_HOME=str(home))
    result = gpu_check.step_sanitizer(ctx, 60)
    assert result.status == gpu_check.PASSED, result.reason
    assert [c.argv[2] for c in result.commands] == ["memcheck", "racecheck", "synccheck", "initcheck"]
    assert all(c.argv[3:5] == ["--error-exitcode", "1"] for c in result.commands)
    assert all(c.stdout.strip().endswith("scripts/sanitizer_cases.py") for c in result.commands)
    assert "sanitizer memcheck 1:" in result.commands[0].stdout
