"""Without a usable avidfast._C, avidfast still imports and an op raises one clear error.

Each case runs a fresh interpreter in which the extension is hidden (or looks built against
another torch), as a user meets a broken install.
"""
import os
import subprocess
import sys
import textwrap

import pytest

HIDE_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, sys

    class HideExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "avidfast._C":
                raise ImportError(MESSAGE)
            return None

    sys.meta_path.insert(0, HideExtension())
    """
)

USE_AN_OP = textwrap.dedent(
    """
    import torch
    import avidfast, avidfast.ops, avidfast.losses
    from avidfast.ops import reference
    from avidfast.errors import ExtensionUnavailableError
    assert not avidfast.ops.has_cuda_kernels()
    # the plain-PyTorch references still work
    memory = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    reference.memory_scores(torch.randn(3, 8), memory, torch.randint(0, 50, (3, 4)), 0.07)
    try:
        avidfast.ops.sample_negatives(torch.arange(4), 100, 8, 0, 0)
    except ExtensionUnavailableError as error:
        print("ERROR:", error)
    else:
        raise SystemExit("no error raised")
    """
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="error::DeprecationWarning:avidfast")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, result.stdout
    return lines[0]


def test_missing_extension_gives_one_error_with_the_fix():
    result = _run(HIDE_EXTENSION.replace("MESSAGE", "\"No module named 'avidfast._C'\"") + USE_AN_OP)
    line = _error_line(result)
    assert "avidfast._C" in line and "not installed" in line
    assert "pip install --no-build-isolation" in line
    assert "Traceback" not in result.stderr


def test_extension_built_against_another_torch_by_symbols():
    message = "'/x/avidfast/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev'"
    result = _run(HIDE_EXTENSION.replace("MESSAGE", message) + USE_AN_OP)
    line = _error_line(result)
    assert "built against another version of torch" in line and "undefined symbol" in line
    assert "--force-reinstall" in line and "avidfast info" in line


def test_extension_built_against_another_torch_by_version():
    pretend = "import torch\ntorch.__version__ = '9.99.0+cpu'\n"
    result = _run(pretend + USE_AN_OP)
    line = _error_line(result)
    assert "built against torch" in line and "9.99.0+cpu" in line
    assert "pip install --no-build-isolation" in line


def test_cli_reports_the_missing_extension_in_one_line():
    code = HIDE_EXTENSION.replace("MESSAGE", "\"No module named 'avidfast._C'\"") + textwrap.dedent(
        """
        from avidfast.cli import main
        print("RC", main(sys.argv[1:]))
        """
    )
    info = _run(code, "info")
    assert info.returncode == 0 and "RC 0" in info.stdout, info.stdout + info.stderr
    assert "extension: NOT USABLE." in info.stdout
    bench = _run(code, "bench", "ops", "--num-items", "200", "--batch", "4", "--negatives", "8",
                 "--rounds", "1", "--warmup", "0")
    assert "RC 2" in bench.stdout, bench.stdout + bench.stderr
    errors = [line for line in bench.stderr.splitlines() if line.strip()]
    assert errors and errors[-1].startswith("avidfast: error: avidfast's compiled operators"), bench.stderr
    assert "Traceback" not in bench.stderr


def test_info_describes_the_build():
    pytest.importorskip("avidfast._C")
    result = subprocess.run([sys.executable, "-m", "avidfast.cli", "info", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import json

    import torch

    facts = json.loads(result.stdout)
    ext = facts["extension"]
    assert ext["loaded"] and ext["error"] is None
    assert ext["built_against_torch"] == torch.__version__.split("+")[0]
    assert ext["cpu_kernels"]["row_loops"].split()[0] in ("x86-64-v4", "x86-64-v3", "baseline")
    flags = facts["cpu"]["flags"]
    if "avx512f" not in flags and "avx2" in flags:
        assert ext["cpu_kernels"]["row_loops"].startswith("x86-64-v3")
    assert facts["torch"] == torch.__version__
    text = subprocess.run([sys.executable, "-m", "avidfast.cli", "info"], capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0 and "torch the extension was built against" in text.stdout
