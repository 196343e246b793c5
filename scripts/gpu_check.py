#!/usr/bin/env python3
"""`make gpu-check`: every GPU measurement of avidfast in one command, on a machine with an NVIDIA GPU.

Run from a fresh clone (no network needed):

    python3 scripts/gpu_check.py --report gpu-report.md

Without a GPU (``nvidia-smi -L`` lists none, or ``torch.cuda.is_available()`` is False in
--python) it prints one line and exits 0. With one, it runs these steps in order, each in
subprocesses with its own timeout (together they fit --budget-seconds, 10 minutes by default on
one H100/H200), records each one's status, seconds and the figure tables the commands print,
and carries on after a failure:

  build        pip install --no-build-isolation --no-index --no-deps . with AVIDFAST_CUDA=1
               (TORCH_CUDA_ARCH_LIST defaults to the visible GPUs' compute capability), then an
               import check from outside the checkout: avidfast._C must carry the CUDA kernels
  cuda-tests   python -m pytest -q -m cuda on the test files marked cuda, run from a folder
               outside the checkout so that the installed package is what is tested
  sanitizer    scripts/sanitizer_cases.py (small cases of every kernel and launch path) under
               compute-sanitizer's memcheck, racecheck, synccheck and initcheck; skipped when
               compute-sanitizer is not found ($CUDA_HOME/bin or PATH)
  sync-checks  benchmarks/gpu_value_checks.py: the Cross-AVID loss step with the value checks on
               the device (the default) and on the host (AVIDFAST_SYNC_CHECKS=1), ms per step
  bench-ops    avidfast bench ops --device cuda (memory-bank operators vs the reference formulation)
  cma-topk     benchmarks/gpu_cma_topk.py at AudioSet's N = 1,784,108 (TF32 and bf16 banks)
  loader       avidfast synthetic + prepare --transcode h264 --extract-audio wav + bench loader with
               the DALI GPU pipeline beside our CPU pipeline and the reference-shaped loader; the same
               on the Big Buck Bunny clips when they are in the media cache
  bench-train  avidfast bench train --device cuda --preset table6 (fp32, channels_last, bf16 steps)
  avid-run     avidfast synthetic + prepare + avidfast train demo on the GPU for up to 3 minutes
               (stopped by SIGTERM, which checkpoints); passes when the mean loss of the last 20%
               of the logged steps is below that of the first 20%

Timeouts at the default budget (seconds): build 140, cuda-tests 75, sanitizer 60, sync-checks
20, bench-ops 30, cma-topk 85, loader 50, bench-train 35, avid-run 90: 585 in all (budget 600). Time an earlier step leaves unused goes to
the build (up to 240), the loader (up to 100) and the AVID run (up to 220: 180 s of training),
never into another step's share; --budget-seconds scales them all.

A step whose optional package is missing (av, pyyaml, tensorboard, pillow, nvidia-dali, pytest)
is reported as "skipped: <package> not installed". The Markdown report (GPU, driver, CUDA, torch,
Python, CPU, date, commit, then one section per step) is rewritten atomically after every step;
the exit status is 1 when any step FAILED. Only the standard library is imported here.
"""
import argparse
import csv
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REPORT = "gpu-report.md"
DEFAULT_BUDGET = 600.0
PASSED, FAILED, SKIPPED = "passed", "FAILED", "skipped"
TAIL_LINES = 40
MAX_BLOCK_LINES = 200
# The AVID run: training time is at most this (the "3-minute run"), stopped by SIGTERM.
AVID_TRAIN_SECONDS = 180.0
AVID_GRACE_SECONDS = 20.0  # after SIGTERM: checkpoint and exit; then the process group is killed

# Python module -> package name to install, for "skipped: <package> not installed".
PACKAGES = {
    "pip": "pip", "setuptools": "setuptools", "pytest": "pytest", "numpy": "numpy", "av": "av",
    "yaml": "pyyaml", "tensorboard": "tensorboard", "PIL": "pillow", "nvidia.dali": "nvidia-dali-cuda130",
    "tqdm": "tqdm", "matplotlib": "matplotlib",
}
# Distribution names whose versions go into the report header.
DISTRIBUTIONS = ("numpy", "av", "PyYAML", "tqdm", "tensorboard", "matplotlib", "pillow", "pytest",
                 "setuptools", "wheel", "ninja", "nvidia-dali-cuda130")

Command = Sequence[str]


# ------------------------------------------------------------------------------------------ results


@dataclass
class CommandResult:
    """One subprocess: what ran, how it ended, what it printed."""

    argv: List[str]
    returncode: Optional[int]
    seconds: float
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False  # killed at its timeout
    stopped: bool = False  # sent SIGTERM at its soft time limit (a planned stop, e.g. a time-boxed run)
    shown: str = ""  # how the command is shown in the report (env assignments + argv)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe_failure(self) -> str:
        if self.timed_out:
            return f"`{self.argv_text(short=True)}` timed out after {self.seconds:.0f} s"
        if self.returncode is None:
            return f"`{self.argv_text(short=True)}` could not start: {self.stderr.strip().splitlines()[-1:]}"
        return f"`{self.argv_text(short=True)}` exited with status {self.returncode}"

    def argv_text(self, short: bool = False) -> str:
        words = [w if "\n" not in w else "<inline script>" for w in self.argv]
        if short:
            words = [os.path.basename(words[0])] + words[1:5]
            return shlex.join(words).replace("'<inline script>'", "<inline script>") + (" ..." if len(self.argv) > 5 else "")
        return self.shown or shlex.join(words).replace("'<inline script>'", "<inline script>")


@dataclass
class StepResult:
    """One step of the check: status, time, the commands and the figures they printed."""

    name: str
    title: str
    status: str  # passed, FAILED or skipped
    seconds: float = 0.0
    timeout: Optional[float] = None
    reason: str = ""  # one line: why it failed or was skipped
    commands: List[CommandResult] = field(default_factory=list)
    blocks: List[Tuple[str, str]] = field(default_factory=list)  # (caption, verbatim text)
    notes: List[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def status_line(self) -> str:
        if self.status == SKIPPED:
            return f"skipped: {self.reason}" if self.reason else "skipped"
        if self.status == FAILED:
            return f"FAILED: {self.reason}" if self.reason else "FAILED"
        return PASSED


# ------------------------------------------------------------------------------------ subprocesses


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(argv: Command, timeout: float, cwd: Optional[Union[str, Path]] = None,
                env: Optional[Dict[str, str]] = None, soft_timeout: Optional[float] = None,
                grace: float = AVID_GRACE_SECONDS, shown: str = "") -> CommandResult:
    """Runs argv in its own process group, output captured to temporary files.

    At ``soft_timeout`` seconds (if given) the main process gets SIGTERM (a planned stop: the
    command is expected to save and exit), and ``grace`` seconds later, or at ``timeout``
    whichever is first, the whole process group is killed (timed_out).
    """
    argv = [str(a) for a in argv]
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = subprocess.Popen(argv, cwd=None if cwd is None else str(cwd), env=env, stdout=out,
                                       stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as error:
            return CommandResult(argv, None, time.monotonic() - started, "", f"{error}\n", shown=shown)
        timed_out = stopped = False
        try:
            deadline = started + max(0.0, timeout)
            if soft_timeout is not None and soft_timeout < timeout:
                try:
                    process.wait(timeout=max(0.0, soft_timeout))
                except subprocess.TimeoutExpired:
                    stopped = True
                    try:
                        process.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    deadline = min(deadline, time.monotonic() + grace)
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                _kill_group(process, signal.SIGKILL)
                process.wait()
        except BaseException:  # KeyboardInterrupt: leave nothing running
            _kill_group(process, signal.SIGKILL)
            process.wait()
            raise
        # Children that outlived the main process (e.g. DataLoader workers) go with it.
        _kill_group(process, signal.SIGKILL)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    return CommandResult(argv, process.returncode, seconds, stdout, stderr, timed_out, stopped, shown)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of text (carriage-return progress redraws reduced to their last state)."""
    rows = [row.rsplit("\r", 1)[-1] for row in text.rstrip().splitlines()]
    return "\n".join(rows[-lines:])


def _failure_blocks(result: CommandResult) -> List[Tuple[str, str]]:
    blocks = []
    if result.stdout.strip():
        blocks.append((f"stdout of `{result.argv_text(short=True)}` (last {TAIL_LINES} lines)", tail(result.stdout)))
    if result.stderr.strip():
        blocks.append((f"stderr of `{result.argv_text(short=True)}` (last {TAIL_LINES} lines)", tail(result.stderr)))
    return blocks


def run_step(name: str, cmd: Union[Command, Sequence[Command]], timeout: float, cwd: Optional[Union[str, Path]] = None,
             env: Optional[Dict[str, str]] = None, title: str = "") -> StepResult:
    """Runs one command (or several in turn, sharing ``timeout``) as a step.

    Passed when every command exits 0; the stdout of each successful command is kept verbatim as
    the step's figures. The first failing command ends the step: FAILED, with the tail of its
    output; a command that would start with no time left is not started.
    """
    commands = [list(cmd)] if cmd and isinstance(cmd[0], str) else [list(c) for c in cmd]
    step = StepResult(name, title or name, PASSED, timeout=timeout)
    started = time.monotonic()
    for argv in commands:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            step.status, step.reason = FAILED, f"no time left for `{shlex.join(argv[:5])}` (step timeout {timeout:.0f} s)"
            break
        result = run_command(argv, left, cwd, env)
        step.commands.append(result)
        if not result.ok:
            step.status, step.reason = FAILED, result.describe_failure()
            step.blocks.extend(_failure_blocks(result))
            break
        if result.stdout.strip():
            step.blocks.append((f"`{result.argv_text(short=True)}`", result.stdout))
    step.seconds = time.monotonic() - started
    return step


# ----------------------------------------------------------------------------------- GPU detection


@dataclass
class GPUInfo:
    """What the detection found: whether the check can run, and the facts for the report header."""

    available: bool
    reason: str = ""  # why not
    nvidia_smi: Optional[str] = None
    smi_lines: List[str] = field(default_factory=list)  # nvidia-smi -L
    probe: Dict[str, object] = field(default_factory=dict)  # what --python's torch says

    @property
    def capabilities(self) -> List[str]:
        return sorted({d["capability"] for d in self.probe.get("devices", [])}, key=lambda c: tuple(map(int, c.split("."))))


TORCH_PROBE = r"""
import importlib.util, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
modules = {}
for name in MODULES:
    try:
        modules[name] = importlib.util.find_spec(name) is not None
    except Exception:
        modules[name] = False
info["modules"] = modules
versions = {}
try:
    from importlib import metadata
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except Exception:
            pass
except Exception:
    pass
info["versions"] = versions
try:
    import torch
except Exception as error:
    info["torch_error"] = repr(error)
    print(json.dumps(info))
    raise SystemExit(0)
info["torch"] = torch.__version__
info["torch_cuda"] = torch.version.cuda
info["available"] = bool(torch.cuda.is_available())
if info["available"]:
    info["devices"] = [{"name": torch.cuda.get_device_name(i),
                        "capability": "%d.%d" % torch.cuda.get_device_capability(i)}
                       for i in range(torch.cuda.device_count())]
    info["cudnn"] = torch.backends.cudnn.version()
    info["bf16"] = bool(torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


def _probe_source() -> str:
    return f"MODULES = {sorted(PACKAGES)!r}\nDISTRIBUTIONS = {list(DISTRIBUTIONS)!r}\n" + TORCH_PROBE


def _one_line(text: str, limit: int = 120) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def detect_gpu(python: str = sys.executable, env: Optional[Dict[str, str]] = None) -> GPUInfo:
    """A GPU counts when `nvidia-smi -L` lists one AND torch.cuda.is_available() in ``python``."""
    env = dict(os.environ if env is None else env)
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if smi is None:
        return GPUInfo(False, "nvidia-smi not found on PATH")
    listed = run_command([smi, "-L"], 60, env=env)
    lines = [line.strip() for line in listed.stdout.splitlines() if line.strip().startswith("GPU ")]
    if listed.returncode != 0 or not lines:
        said = _one_line(listed.stdout + " " + listed.stderr, 80)
        return GPUInfo(False, "nvidia-smi -L lists no GPU" + (f": {said}" if said else ""), smi)
    probed = run_command([python, "-c", _probe_source()], 180, env=env)
    try:
        probe = json.loads(probed.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        said = _one_line(tail(probed.stderr, 3), 100) or f"exit status {probed.returncode}"
        return GPUInfo(False, f"{python} could not report on torch ({said})", smi, lines)
    if "torch_error" in probe:
        return GPUInfo(False, f"torch is not importable by {python} ({_one_line(str(probe['torch_error']), 80)})",
                       smi, lines, probe)
    if not probe.get("available"):
        return GPUInfo(False, f"nvidia-smi lists {len(lines)} GPU(s) but torch.cuda.is_available() is False "
                              f"in {python} (torch {probe.get('torch')}, CUDA {probe.get('torch_cuda')})",
                       smi, lines, probe)
    return GPUInfo(True, "", smi, lines, probe)


def no_gpu_message(gpu: GPUInfo) -> str:
    return f"gpu-check: no NVIDIA GPU visible ({gpu.reason}); nothing to do"


# ------------------------------------------------------------------------------------ machine info


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cuda_home(env: Dict[str, str]) -> Optional[str]:
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        return home
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def _nvcc(env: Dict[str, str]) -> Optional[str]:
    home = _cuda_home(env)
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc", path=env.get("PATH", os.defpath))


def machine_info(gpu: GPUInfo, python: str, env: Dict[str, str], budget: float) -> Dict[str, str]:
    """The report header: label -> value."""
    info: Dict[str, str] = {}
    query = run_command([gpu.nvidia_smi or "nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                         "--format=csv,noheader"], 30, env=env) if gpu.nvidia_smi else None
    gpus = [line.strip() for line in query.stdout.splitlines() if line.strip()] if query is not None and query.ok else []
    if gpus:
        info["GPU"] = "; ".join(f"{line.split(',')[0].strip()} (driver {line.split(',')[1].strip()}, "
                                f"{line.split(',')[2].strip()})" if line.count(",") >= 2 else line for line in gpus)
    else:
        info["GPU"] = "; ".join(d["name"] for d in gpu.probe.get("devices", [])) or "unknown"
    if gpu.capabilities:
        info["compute capability"] = ", ".join(gpu.capabilities)
    nvcc = _nvcc(env)
    release = "not found"
    if nvcc:
        version = run_command([nvcc, "--version"], 30, env=env)
        found = [line.strip() for line in version.stdout.splitlines() if "release" in line]
        release = f"{found[0]} ({nvcc})" if found else f"{nvcc}: {_one_line(version.stdout + version.stderr, 80)}"
    info["CUDA"] = f"nvcc: {release}; torch built with CUDA {gpu.probe.get('torch_cuda')}"
    cudnn = gpu.probe.get("cudnn")
    info["torch"] = f"{gpu.probe.get('torch')}" + (f" (cuDNN {cudnn})" if cudnn else "")
    info["Python"] = f"{gpu.probe.get('python', platform.python_version())} ({gpu.probe.get('executable', python)})"
    info["CPU"] = f"{_cpu_model()}, {_cpu_count()} logical CPUs"
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["commit"] = git_commit(env)
    versions = gpu.probe.get("versions", {})
    modules = gpu.probe.get("modules", {})
    missing = [PACKAGES[m] for m in sorted(modules) if not modules[m]]
    info["packages"] = (", ".join(f"{k} {v}" for k, v in sorted(versions.items(), key=lambda kv: kv[0].lower()))
                        + (f"; not installed: {', '.join(missing)}" if missing else ""))
    info["budget"] = f"{budget:.0f} s"
    return info


def git_commit(env: Optional[Dict[str, str]] = None) -> str:
    """HEAD of the checkout (+ "(uncommitted changes)"), or "unknown" outside git."""
    if shutil.which("git") is None:
        return "unknown (git not installed)"
    head = run_command(["git", "-C", str(REPO), "rev-parse", "HEAD"], 20, env=env)
    if not head.ok:
        return "unknown (not a git checkout)"
    dirty = run_command(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], 20, env=env)
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.ok and dirty.stdout.strip() else "")


# ------------------------------------------------------------------------------------------ report


def _fence(text: str) -> str:
    runs = [len(m) for m in re.findall(r"`{3,}", text)]
    return "`" * max([3] + [n + 1 for n in runs])


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _block(caption: str, text: str) -> List[str]:
    rows = [row.rsplit("\r", 1)[-1] for row in text.rstrip("\n").splitlines()]
    if len(rows) > MAX_BLOCK_LINES:
        rows = rows[:MAX_BLOCK_LINES] + [f"... ({len(rows) - MAX_BLOCK_LINES} more lines)"]
    body = "\n".join(rows)
    fence = _fence(body)
    return [f"{caption}:", "", fence, body, fence, ""]


def render_report(machine: Dict[str, str], results: Sequence[StepResult], pending: Sequence[str] = (),
                  elapsed: Optional[float] = None) -> str:
    gpu = machine.get("GPU", "unknown GPU")
    title_gpu = gpu.split(" (driver")[0] if gpu else "unknown GPU"
    date = machine.get("date", "")
    lines = [f"## GPU check: {title_gpu}" + (f", {date}" if date else ""), ""]
    lines.append("Produced by `make gpu-check` (`scripts/gpu_check.py`); every figure below is printed by the "
                 "command shown, beside its baseline measured in the same run.")
    lines.append("")
    lines += ["| | |", "|---|---|"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in machine.items()]
    lines.append("")
    lines += ["| step | status | seconds | timeout (s) |", "|---|---|---:|---:|"]
    for i, step in enumerate(results, 1):
        timeout = f"{step.timeout:.0f}" if step.timeout else "-"
        seconds = f"{step.seconds:.1f}" if step.status != SKIPPED or step.seconds else "-"
        lines.append(f"| {i}. {_cell(step.title)} (`{step.name}`) | {_cell(step.status_line())} | {seconds} | {timeout} |")
    for j, name in enumerate(pending, len(results) + 1):
        lines.append(f"| {j}. `{name}` | not run yet | - | - |")
    failed = [s for s in results if s.failed]
    passed = sum(1 for s in results if s.status == PASSED)
    skipped = sum(1 for s in results if s.status == SKIPPED)
    lines.append("")
    verdict = (f"**Result: {len(failed)} step(s) FAILED** ({', '.join(s.name for s in failed)})" if failed
               else "**Result: no step failed**")
    lines.append(f"{verdict}; {passed} passed, {skipped} skipped"
                 + (f", {len(pending)} not run yet" if pending else "")
                 + (f"; total {elapsed:.0f} s." if elapsed is not None else "."))
    lines.append("")
    for i, step in enumerate(results, 1):
        lines.append(f"### {i}. {step.title}")
        lines.append("")
        timeout = f" (timeout {step.timeout:.0f} s)" if step.timeout else ""
        status = step.status_line() if step.status != PASSED else "**passed**"
        if step.status == FAILED:
            status = "**" + status + "**"
        if step.status == SKIPPED and not step.seconds:
            lines.append(f"Status: {status}.")
        else:
            lines.append(f"Status: {status}, {step.seconds:.1f} s{timeout}.")
        lines.append("")
        for note in step.notes:
            lines.append(f"- {note}")
        if step.notes:
            lines.append("")
        if step.commands:
            shown = "\n".join(f"{c.argv_text()}    # {c.seconds:.1f} s, "
                              + ("timed out" if c.timed_out else f"exit {c.returncode}")
                              + (" after SIGTERM at its time limit" if c.stopped else "") for c in step.commands)
            lines += _block("Commands", shown)
        for caption, text in step.blocks:
            if text.strip():
                lines += _block(caption, text)
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Union[str, Path], machine: Dict[str, str], results: Sequence[StepResult],
                 pending: Sequence[str] = (), elapsed: Optional[float] = None) -> str:
    """Writes the Markdown report atomically (temporary file in the same folder, then os.replace)."""
    path = os.path.abspath(str(path))
    text = render_report(machine, results, pending, elapsed)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make the report private
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# --------------------------------------------------------------------------------------- the steps


@dataclass
class Context:
    """What every step needs: interpreter, folders, environment, the GPU facts, the options."""

    python: str
    work: Path
    env: Dict[str, str]
    gpu: GPUInfo
    cpus: int
    no_build: bool = False
    installed: Optional[Dict[str, object]] = None  # the import check's answer, once known
    install_checked: bool = False  # the import check ran (or the build failed: nothing to check)

    def avidfast(self, *args: str) -> List[str]:
        return [self.python, "-m", "avidfast.cli", *args]

    @property
    def workers(self) -> int:
        return max(1, min(12, self.cpus - 2))

    @property
    def ready(self) -> bool:
        """avidfast imports from outside the checkout with its CUDA kernels."""
        answer = self.installed or {}
        return bool(answer) and not answer.get("load_error") and bool(answer.get("cuda_kernels"))


@dataclass
class Step:
    """A step of the plan. ``timeout``: seconds at the default budget; ``extend_to``: how long it may
    run when earlier steps left time unused (default: its timeout)."""

    name: str
    title: str
    timeout: float
    run: Callable[[Context, float], StepResult]
    needs: Tuple[str, ...] = ("numpy",)
    needs_avidfast: bool = True
    extend_to: Optional[float] = None


IMPORT_CHECK = r"""
import json, avidfast
info = {"file": avidfast.__file__, "version": getattr(avidfast, "__version__", "?")}
try:
    from avidfast.ops import _extension
    info["load_error"] = getattr(_extension, "LOAD_ERROR", None)
except Exception as error:
    info["load_error"] = repr(error)
from avidfast.ops import has_cuda_kernels
info["cuda_kernels"] = bool(has_cuda_kernels())
print(json.dumps(info))
"""


def check_installed(ctx: Context, timeout: float) -> Tuple[CommandResult, Optional[str]]:
    """Imports avidfast from outside the checkout; returns (command, problem or None)."""
    result = run_command([ctx.python, "-c", IMPORT_CHECK], timeout, cwd=ctx.work, env=ctx.env)
    ctx.installed, ctx.install_checked = None, True
    if not result.ok:
        return result, f"avidfast is not importable by {ctx.python}: {_one_line(tail(result.stderr, 1), 100)}"
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return result, "the import check printed no answer"
    ctx.installed = answer
    if answer.get("load_error"):
        return result, _one_line(str(answer["load_error"]), 200)
    if not answer.get("cuda_kernels"):
        return result, "avidfast._C was built without the CUDA kernels"
    return result, None


def _installed_note(ctx: Context) -> str:
    answer = ctx.installed or {}
    folder = os.path.dirname(str(answer.get("file", "?")))
    editable = " (the source tree: an editable install)" if folder.startswith(str(REPO) + os.sep) \
        and "site-packages" not in folder else ""
    return (f"installed avidfast {answer.get('version')} at {folder}{editable}, "
            f"CUDA kernels: {'yes' if answer.get('cuda_kernels') else 'no'}")


def _error_lines(text: str, limit: int = 40) -> str:
    """The lines of a build log that name an error (compiler, ninja, setuptools), in order."""
    pattern = re.compile(r"error|FAILED:|fatal|undefined reference|No such file", re.IGNORECASE)
    rows = [row.rsplit("\r", 1)[-1] for row in text.splitlines() if pattern.search(row)]
    return "\n".join(rows[:limit])


def step_build(ctx: Context, timeout: float) -> StepResult:
    title = "Build with the CUDA kernels"
    started = time.monotonic()
    if ctx.no_build:
        result, problem = check_installed(ctx, min(timeout, 120))
        step = StepResult("build", title, FAILED if problem else SKIPPED, time.monotonic() - started, timeout,
                          f"--no-build, and {problem}" if problem else f"--no-build: {_installed_note(ctx)}",
                          [result])
        if problem:
            step.blocks.extend(_failure_blocks(result))
        return step
    env = dict(ctx.env)
    notes = []
    home = _cuda_home(env)
    if home:
        env["CUDA_HOME"] = home
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(ctx.gpu.capabilities) or "9.0"
    env.setdefault("MAX_JOBS", str(ctx.cpus))
    env["AVIDFAST_CUDA"] = "1"
    python_bin = os.path.dirname(os.path.abspath(shutil.which(ctx.python) or ctx.python))
    if shutil.which("ninja", path=env.get("PATH", "")) is None:
        if os.access(os.path.join(python_bin, "ninja"), os.X_OK):
            env["PATH"] = python_bin + os.pathsep + env.get("PATH", "")
        else:
            notes.append("ninja is not installed: torch's extension builder compiles the sources one after "
                         "another (MAX_JOBS has no effect), which may not fit the timeout; install ninja "
                         "(`pip install ninja`, offline: a wheel) to compile in parallel.")
    argv = [ctx.python, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--no-deps", "."]
    shown = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "AVIDFAST_CUDA")
                     if k in env) + " " + shlex.join(argv)
    build = run_command(argv, timeout, cwd=REPO, env=env, shown=shown)
    step = StepResult("build", title, PASSED, timeout=timeout, commands=[build], notes=notes)
    if not build.ok:
        ctx.install_checked = True  # an older install must not be tested in its place
        step.status, step.reason = FAILED, build.describe_failure()
        errors = _error_lines(build.stdout + "\n" + build.stderr)
        if errors:
            step.blocks.append(("lines naming an error (first 40)", errors))
        step.blocks.extend(_failure_blocks(build))
        output = build.stdout + build.stderr
        if "externally-managed-environment" in output:
            step.notes.append("pip refuses to install into this externally managed Python; use a virtual "
                              "environment with --system-site-packages, or set PIP_BREAK_SYSTEM_PACKAGES=1.")
    else:
        step.blocks.append(("pip (last lines)", tail(build.stdout, 5)))
        left = timeout - (time.monotonic() - started)
        result, problem = check_installed(ctx, max(10.0, left))
        step.commands.append(result)
        if problem:
            step.status, step.reason = FAILED, problem
            step.blocks.extend(_failure_blocks(result))
        else:
            step.notes.append(_installed_note(ctx))
            left = timeout - (time.monotonic() - started)
            if left > 10:  # versions and CUDA archs compiled in, where this avidfast has `avidfast info`
                info = run_command(ctx.avidfast("info"), min(60.0, left), cwd=ctx.work, env=ctx.env)
                if info.ok and info.stdout.strip():
                    step.commands.append(info)
                    step.blocks.append(("`avidfast info`", info.stdout))
    step.seconds = time.monotonic() - started
    return step


def cuda_test_files(tests: Path = REPO / "tests") -> List[Path]:
    """The test files holding tests marked cuda (all of tests/ when none is found)."""
    files = sorted(p for p in tests.glob("test_*.py") if re.search(r"mark\.cuda\b", p.read_text(errors="replace")))
    return files or [tests]


def step_cuda_tests(ctx: Context, timeout: float) -> StepResult:
    files = cuda_test_files()
    argv = [ctx.python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *map(str, files)]
    step = run_step("cuda-tests", argv, timeout, cwd=ctx.work, env=ctx.env, title="CUDA tests (installed package)")
    step.notes.append(f"run from {ctx.work} (outside the checkout) so that `import avidfast` is the installed "
                      f"build; files with tests marked cuda: {', '.join(p.name for p in files)}")
    output = "".join(c.stdout for c in step.commands)
    if step.status == PASSED:
        step.blocks = [("pytest summary (last lines)", tail(output, 30))]
        if not re.search(r"\b\d+ passed\b", output):
            step.status, step.reason = FAILED, "no CUDA test ran (all skipped or deselected)"
    return step


SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")


def find_compute_sanitizer(env: Dict[str, str]) -> Optional[str]:
    """compute-sanitizer in $CUDA_HOME/bin (or /usr/local/cuda/bin), else on PATH."""
    home = _cuda_home(env)
    if home and os.access(os.path.join(home, "bin", "compute-sanitizer"), os.X_OK):
        return os.path.join(home, "bin", "compute-sanitizer")
    return shutil.which("compute-sanitizer", path=env.get("PATH", os.defpath))


def step_sanitizer(ctx: Context, timeout: float) -> StepResult:
    title = "compute-sanitizer: memcheck, racecheck, synccheck, initcheck"
    sanitizer = find_compute_sanitizer(ctx.env)
    if sanitizer is None:
        return StepResult("sanitizer", title, SKIPPED, reason="compute-sanitizer not found ($CUDA_HOME/bin, PATH)")
    env = dict(ctx.env)
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # an access past a tensor is past its allocation
    script = str(REPO / "scripts" / "sanitizer_cases.py")
    commands = [[sanitizer, "--tool", tool, "--error-exitcode", "1", ctx.python, script] for tool in SANITIZER_TOOLS]
    step = run_step("sanitizer", commands, timeout, cwd=ctx.work, env=env, title=title)
    step.notes.append("scripts/sanitizer_cases.py: every launch path of every kernel on small shapes, and a bad "
                      "index recorded on the device; PYTORCH_NO_CUDA_MEMORY_CACHING=1")
    return step


def step_sync_checks(ctx: Context, timeout: float) -> StepResult:
    argv = [ctx.python, str(REPO / "benchmarks" / "gpu_value_checks.py")]
    return run_step("sync-checks", argv, timeout, cwd=ctx.work, env=ctx.env,
                    title="Value checks on the device vs on the host: `benchmarks/gpu_value_checks.py`")


def step_bench_ops(ctx: Context, timeout: float) -> StepResult:
    argv = ctx.avidfast("bench", "ops", "--device", "cuda", "--rounds", "20", "--warmup", "5",
                        "--json", str(ctx.work / "bench-ops.json"))
    return run_step("bench-ops", argv, timeout, cwd=ctx.work, env=ctx.env,
                    title="Memory-bank operators: `avidfast bench ops --device cuda`")


def step_cma_topk(ctx: Context, timeout: float) -> StepResult:
    argv = [ctx.python, str(REPO / "benchmarks" / "gpu_cma_topk.py"), "--configs", "high,bf16"]
    step = run_step("cma-topk", argv, timeout, cwd=ctx.work, env=ctx.env,
                    title="CMA positive mining at AudioSet's N: `benchmarks/gpu_cma_topk.py`")
    step.notes.append("N = 1,784,108 (the script's default), D = 128, k = 32; configs high (TF32) and bf16: the "
                      "fp32-FMA config `highest` is left out to fit the time budget (run it by hand with "
                      "`--configs highest`).")
    out = "".join(c.stdout for c in step.commands)
    if step.status == PASSED and "FAILED" in out:
        step.status, step.reason = FAILED, "a correctness check against the exact top k FAILED (see the table)"
    if "NOT met" in out:
        step.notes.append("the <= 10 s target for TF32 and bf16 is NOT met (see the table)")
    return step


def media_cache(env: Dict[str, str]) -> Path:
    """tests/media.py's cache: $AVIDFAST_MEDIA_CACHE or ~/.cache/avidfast/media."""
    return Path(env.get("AVIDFAST_MEDIA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "avidfast", "media"))


def find_bbb(env: Dict[str, str]) -> Tuple[Optional[Path], bool, str]:
    """(manifest of Big Buck Bunny clips, whether fetch_media.py can cut them offline, why absent)."""
    cache = media_cache(env)
    for manifest in sorted(cache.glob("bbb_clips_*/manifest.csv")):
        return manifest, False, ""
    if (cache / "bbb.mp4").is_file() or any(cache.glob("moviepy-*.tar.gz")):
        return None, True, ""
    return None, False, (f"Big Buck Bunny is not in the media cache ({cache}); `make media` fetches it on a "
                         "machine with internet (set AVIDFAST_MEDIA_CACHE to use another cache)")


def step_loader(ctx: Context, timeout: float) -> StepResult:
    title = "Data pipeline: DALI on the GPU vs our CPU pipeline and the reference-shaped loader"
    started = time.monotonic()
    left = lambda: timeout - (time.monotonic() - started)  # noqa: E731
    syn, prep = ctx.work / "loader-synthetic", ctx.work / "loader-prepared"
    workers = str(min(8, ctx.cpus))
    commands = [
        ctx.avidfast("synthetic", str(syn), "--videos", "64", "--classes", "8", "--seconds", "4",
                     "--workers", str(ctx.workers), "--quiet"),
        ctx.avidfast("prepare", str(syn / "manifest.csv"), str(prep), "--transcode", "h264", "--extract-audio", "wav",
                     "--workers", str(ctx.workers), "--quiet"),
        ctx.avidfast("bench", "loader", str(prep / "manifest.csv"), "--dali-manifest", str(prep / "manifest.csv"),
                     "--dali-device", "0", "--workers", workers, "--batch", "8", "--clips", "96", "--rounds", "3",
                     "--json", str(ctx.work / "bench-loader-synthetic.json")),
    ]
    step = run_step("loader", commands, timeout, cwd=ctx.work, env=ctx.env, title=title)
    if step.blocks and step.status == PASSED:
        step.blocks[-1] = ("Synthetic set (64 clips, 128x128, H.264 re-encoded by `avidfast prepare`), "
                           "`avidfast bench loader`", step.blocks[-1][1])
    manifest, can_cut, absent = find_bbb(ctx.env)
    if can_cut and left() > 40:
        cut = run_command([ctx.python, str(REPO / "scripts" / "fetch_media.py")], min(60.0, left() - 30),
                          cwd=ctx.work, env=ctx.env)
        step.commands.append(cut)
        manifest, _, absent = find_bbb(ctx.env)
        if manifest is None:
            absent = f"cutting the clips from the cached Big Buck Bunny failed ({cut.describe_failure()})"
    if manifest is None:
        step.notes.append(f"Big Buck Bunny clips: skipped: {absent or 'not in the media cache'}")
    elif left() < 30:
        step.notes.append(f"Big Buck Bunny clips: skipped: only {max(0.0, left()):.0f} s of the step's time left")
    else:
        bbb = ctx.work / "bbb-prepared"
        sub = run_step("loader", [
            ctx.avidfast("prepare", str(manifest), str(bbb), "--transcode", "h264", "--extract-audio", "wav",
                         "--workers", str(min(4, ctx.workers)), "--quiet"),
            ctx.avidfast("bench", "loader", str(bbb / "manifest.csv"), "--dali-manifest", str(bbb / "manifest.csv"),
                         "--dali-device", "0", "--workers", workers, "--batch", "8", "--clips", "32", "--rounds", "3",
                         "--json", str(ctx.work / "bench-loader-bbb.json")),
        ], left(), cwd=ctx.work, env=ctx.env)
        step.commands.extend(sub.commands)
        if sub.status == PASSED:
            step.blocks.append((f"Big Buck Bunny clips ({manifest.parent.name}, 1280x720 H.264 re-encoded at 16 fps), "
                                "`avidfast bench loader`", sub.blocks[-1][1] if sub.blocks else ""))
        else:
            step.blocks.extend(sub.blocks)
            if step.status == PASSED:
                step.status, step.reason = FAILED, "Big Buck Bunny: " + sub.reason
    step.seconds = time.monotonic() - started
    return step


def step_bench_train(ctx: Context, timeout: float) -> StepResult:
    argv = ctx.avidfast("bench", "train", "--device", "cuda", "--preset", "table6", "--rounds", "5", "--warmup", "2",
                        "--json", str(ctx.work / "bench-train.json"))
    step = run_step("bench-train", argv, timeout, cwd=ctx.work, env=ctx.env,
                    title="Training step, Table 6 networks, bf16 vs fp32: `avidfast bench train --preset table6`")
    step.notes.append("cases: step_fp32 (fp32, contiguous), step_channels_last (fp32, channels_last_3d), "
                      "step_bf16 (bf16 autocast + channels_last_3d); each against a reference-shaped fp32 step")
    return step


def loss_fell(losses: Sequence[float], fraction: float = 0.2, min_steps: int = 10) -> Tuple[bool, str]:
    """Whether the mean loss of the last ``fraction`` of the steps is below that of the first."""
    if len(losses) < min_steps:
        return False, f"only {len(losses)} logged steps (at least {min_steps} needed)"
    k = max(1, int(len(losses) * fraction))
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    verdict = "fell" if last < first else "did NOT fall"
    return last < first, (f"mean loss of the first {k} logged steps {first:.4f}, of the last {k} {last:.4f}: "
                          f"the loss {verdict} ({len(losses)} steps logged)")


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """Rows of a run's metrics.csv (step, epoch, loss, lr, clips_per_s) as floats."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(v) for k, v in row.items() if k})
            except (TypeError, ValueError):
                continue
    return rows


def curve_table(rows: Sequence[Dict[str, float]], points: int = 9) -> str:
    if not rows:
        return ""
    picks = sorted({round(i * (len(rows) - 1) / (points - 1)) for i in range(points)})
    lines = [f"{'step':>7} {'epoch':>6} {'loss':>8} {'clips/s':>9}"]
    for i in picks:
        r = rows[i]
        lines.append(f"{r.get('step', 0):>7.0f} {r.get('epoch', 0):>6.0f} {r.get('loss', float('nan')):>8.4f} "
                     f"{r.get('clips_per_s', float('nan')):>9.1f}")
    return "\n".join(lines)


def step_avid_run(ctx: Context, timeout: float) -> StepResult:
    title = "AVID training on the GPU: the loss must fall"
    started = time.monotonic()
    syn, prep, run = ctx.work / "avid-synthetic", ctx.work / "avid-prepared", ctx.work / "avid-run"
    step = run_step("avid-run", [
        ctx.avidfast("synthetic", str(syn), "--videos", "240", "--classes", "6", "--seconds", "4",
                     "--workers", str(ctx.workers), "--quiet"),
        ctx.avidfast("prepare", str(syn / "manifest.csv"), str(prep), "--extract-audio", "wav",
                     "--workers", str(ctx.workers), "--quiet"),
    ], timeout, cwd=ctx.work, env=ctx.env, title=title)
    if step.failed:
        step.seconds = time.monotonic() - started
        return step
    left = timeout - (time.monotonic() - started)
    train_seconds = min(AVID_TRAIN_SECONDS, left - AVID_GRACE_SECONDS - 5)
    if train_seconds < 20:
        step.status, step.reason = FAILED, f"only {left:.0f} s left for training"
        step.seconds = time.monotonic() - started
        return step
    overrides = [
        f"data.manifest={prep / 'manifest.csv'}", f"out_dir={run}", "name=gpu-check",
        f"data.workers={ctx.workers}", "optim.epochs=1000", "optim.samples_per_epoch=2400",
        "train.precision=auto", "train.channels_last=true", "train.log_every=1", "train.progress=false",
    ]
    argv = ctx.avidfast("train", "demo", *[w for o in overrides for w in ("--set", o)])
    result = run_command(argv, left, cwd=ctx.work, env=ctx.env, soft_timeout=train_seconds)
    step.commands.append(result)
    step.notes.append(f"the demo config (Table 5 networks at width 16, 4x64^2 clips, Cross-AVID, K = 128) on 240 "
                      f"synthetic clips, {ctx.workers} DataLoader workers, precision auto (bf16 where supported), "
                      f"channels_last; stopped by SIGTERM (which checkpoints) after {train_seconds:.0f} s of training")
    if not (result.returncode == 0 or (result.stopped and result.returncode in (143, -signal.SIGTERM))) \
            or result.timed_out:
        step.status, step.reason = FAILED, result.describe_failure()
        step.blocks.extend(_failure_blocks(result))
    metrics = run / "metrics.csv"
    rows = read_metrics(metrics) if metrics.is_file() else []
    if rows:
        fell, summary = loss_fell([r["loss"] for r in rows])
        rates = [r["clips_per_s"] for r in rows if "clips_per_s" in r]
        step.notes.append(summary)
        if rates:
            step.notes.append(f"median {statistics.median(rates):.1f} clips/s per step (data wait included)")
        step.blocks.append(("Loss curve (metrics.csv, evenly spaced rows)", curve_table(rows)))
        if step.status == PASSED and not fell:
            step.status, step.reason = FAILED, summary
    elif step.status == PASSED:
        step.status, step.reason = FAILED, f"no metrics in {metrics}"
    log = run / "train.log"
    if log.is_file():
        step.blocks.append(("train.log", tail(log.read_text(errors="replace"), 12)))
    step.seconds = time.monotonic() - started
    return step


STEPS: List[Step] = [
    Step("build", "Build with the CUDA kernels", 140, step_build, needs=("pip", "setuptools"),
         needs_avidfast=False, extend_to=240),
    Step("cuda-tests", "CUDA tests (installed package)", 75, step_cuda_tests, needs=("pytest", "numpy")),
    Step("sanitizer", "compute-sanitizer: memcheck, racecheck, synccheck, initcheck", 60, step_sanitizer,
         needs=()),
    Step("sync-checks", "Value checks on the device vs on the host: `benchmarks/gpu_value_checks.py`", 20,
         step_sync_checks),
    Step("bench-ops", "Memory-bank operators: `avidfast bench ops --device cuda`", 30, step_bench_ops),
    Step("cma-topk", "CMA positive mining at AudioSet's N: `benchmarks/gpu_cma_topk.py`", 85, step_cma_topk),
    Step("loader", "Data pipeline: DALI on the GPU vs our CPU pipeline and the reference-shaped loader", 50,
         step_loader, needs=("numpy", "av", "PIL", "nvidia.dali"), extend_to=100),
    Step("bench-train", "Training step, Table 6 networks, bf16 vs fp32: `avidfast bench train --preset table6`", 35,
         step_bench_train),
    Step("avid-run", "AVID training on the GPU: the loss must fall", 90, step_avid_run,
         needs=("numpy", "av", "yaml", "tensorboard"), extend_to=AVID_TRAIN_SECONDS + 40),
]
STEP_NAMES = [s.name for s in STEPS]


def missing_packages(step: Step, modules: Dict[str, bool]) -> List[str]:
    """Package names of the step's modules that are known to be missing."""
    return [PACKAGES.get(m, m) for m in step.needs if modules.get(m) is False]


def allot(step: Step, scale: float, remaining: float, reserved_later: float) -> float:
    """Seconds this step may take: its timeout (or extend_to, if the later steps' reservations
    leave room), never more than the budget left after those reservations."""
    cap = (step.extend_to or step.timeout) * scale
    return max(0.0, min(cap, remaining - reserved_later))


def run_checks(ctx: Context, steps: Sequence[Step], skip: Sequence[str], budget: float, deadline: float,
               on_progress: Callable[[List[StepResult], List[str]], None] = lambda results, pending: None,
               echo: Callable[[str], None] = print) -> List[StepResult]:
    """Runs the steps in order within the budget; returns one StepResult per step."""
    scale = budget / DEFAULT_BUDGET
    modules = ctx.gpu.probe.get("modules", {})
    planned: List[Tuple[Step, Optional[str]]] = []
    for step in steps:
        reason = None
        if step.name in skip:
            reason = "--skip " + step.name
        else:
            missing = missing_packages(step, modules)
            if missing:
                reason = f"{', '.join(missing)} not installed"
        planned.append((step, reason))
    results: List[StepResult] = []
    for i, (step, reason) in enumerate(planned):
        pending = [s.name for s, _ in planned[i:]]
        on_progress(results, pending)
        if reason is None and step.needs_avidfast:
            if not ctx.install_checked:  # the build step was skipped: test what is installed
                check_installed(ctx, 120)
            if not ctx.ready:
                reason = "avidfast is not installed with its CUDA kernels (see the build step)"
        if reason is None:
            reserved = sum(s.timeout * scale for s, r in planned[i + 1:] if r is None)
            timeout = allot(step, scale, deadline - time.monotonic(), reserved)
            if timeout < min(15.0, step.timeout * scale / 2):
                reason = f"time budget exhausted ({timeout:.0f} s of --budget-seconds {budget:.0f} left)"
        if reason is not None:
            result = StepResult(step.name, step.title, SKIPPED, reason=reason)
            echo(f"gpu-check: [{i + 1}/{len(planned)}] {step.name}: skipped: {reason}")
        else:
            echo(f"gpu-check: [{i + 1}/{len(planned)}] {step.name} (timeout {timeout:.0f} s) ...")
            started = time.monotonic()
            try:
                result = step.run(ctx, timeout)
            except KeyboardInterrupt:
                results.append(StepResult(step.name, step.title, FAILED, time.monotonic() - started, timeout,
                                          "interrupted"))
                on_progress(results, [s.name for s, _ in planned[i + 1:]])
                raise
            except Exception as error:  # a bug here must not lose the other steps' results
                result = StepResult(step.name, step.title, FAILED, time.monotonic() - started, timeout,
                                    f"gpu_check.py error: {error!r}")
            result.timeout = timeout
            echo(f"gpu-check:   {step.name}: {result.status_line()} ({result.seconds:.1f} s)")
        results.append(result)
    on_progress(results, [])
    return results


# ---------------------------------------------------------------------------------------------- main


def _step_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the checkout's tests/
    if env.get("PYTHONPATH"):  # the source tree must not shadow the installed package
        kept = [p for p in env["PYTHONPATH"].split(os.pathsep) if p and os.path.abspath(p) != str(REPO)]
        env["PYTHONPATH"] = os.pathsep.join(kept)
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog="Steps, in order: " + ", ".join(STEP_NAMES) + ". Without a GPU: one line, exit status 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--report", default=DEFAULT_REPORT, metavar="PATH", help="Markdown report to write (atomically)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that builds and runs avidfast")
    parser.add_argument("--skip", action="append", choices=STEP_NAMES, metavar="STEP",
                        help="leave out this step (repeatable; %(default)s: run them all): " + ", ".join(STEP_NAMES))
    parser.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET, metavar="SECONDS",
                        help="wall-clock budget of the whole check; step timeouts scale with it")
    parser.add_argument("--no-build", action="store_true", help="use the already installed avidfast (no pip install)")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="keep data sets, runs and JSON results in a new folder under DIR "
                             "(%(default)s: a temporary folder, removed at the end)")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: stop the running step's process group too, then exit


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    if args.budget_seconds <= 0:
        print("gpu-check: --budget-seconds must be positive", file=sys.stderr)
        return 2
    env = _step_env()
    gpu = detect_gpu(args.python, env)
    if not gpu.available:
        print(no_gpu_message(gpu))
        return 0
    deadline = start + args.budget_seconds - min(5.0, 0.01 * args.budget_seconds)  # room for kills and the report
    machine = machine_info(gpu, args.python, env, args.budget_seconds)
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="avidfast-gpu-check-", dir=args.work_dir)).resolve()
    ctx = Context(args.python, work, env, gpu, _cpu_count(), no_build=args.no_build)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    report = os.path.abspath(args.report)
    print(f"gpu-check: {machine['GPU']}; torch {gpu.probe.get('torch')}; budget {args.budget_seconds:.0f} s; "
          f"report {report}; work folder {work}", flush=True)

    def progress(results: List[StepResult], pending: List[str]) -> None:
        write_report(report, machine, results, pending, time.monotonic() - start)

    results: List[StepResult] = []
    try:
        results = run_checks(ctx, STEPS, args.skip or [], args.budget_seconds, deadline, progress,
                             echo=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"gpu-check: interrupted; partial report: {report}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    write_report(report, machine, results, (), time.monotonic() - start)
    failed = [r.name for r in results if r.failed]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'no step failed'} "
          f"({time.monotonic() - start:.0f} s); report: {report}"
          + (f"; work folder kept: {work}" if args.work_dir else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
