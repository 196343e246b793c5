"""The launch recipes of docs/multi-node.md, the README and scripts/slurm_train.sbatch (issue 18).

No cluster is needed: the SLURM script must pass `bash -n`, and every torchrun command line they
show must parse with torchrun's own argument parser (torch.distributed.run), start the avidfast
command line (`-m avidfast.cli`), and hand it arguments that `avidfast train` accepts. Shell
variables are given example values first.
"""
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_train.sbatch"
EXAMPLES = {"SLURM_JOB_NUM_NODES": "4", "GPUS_PER_NODE": "8", "HEAD_NODE": "node001", "PORT": "29500",
            "SLURM_JOB_ID": "4242", "CONFIG": "avid_s6_audioset", "HOST": "node001"}


def torchrun_lines(text: str):
    """The torchrun command lines of a shell text (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if "torchrun " in line and not line.startswith("#"):
            lines.append(line[line.index("torchrun "):])
    return lines


def _expanded(line: str):
    line = line.replace('"$@"', "")
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: EXAMPLES[m.group(1)], line)
    return shlex.split(line)


def _check(line: str):
    from torch.distributed.run import get_args_parser

    from avidfast.cli import build_parser

    words = _expanded(line)
    assert words[0] == "torchrun", line
    args = get_args_parser().parse_args(words[1:])
    assert args.module and args.training_script == "avidfast.cli", line
    script_args = [w if w != "..." else "data.manifest=x.csv" for w in args.training_script_args]
    avidfast = build_parser().parse_args(script_args)
    assert avidfast.handler.__name__ == "_train"
    return args, avidfast


def _docs_lines():
    """The torchrun lines of the shell code blocks of docs/multi-node.md and the README."""
    blocks = []
    for name in ("docs/multi-node.md", "README.md"):
        blocks += re.findall(r"```sh\n(.*?)```", (ROOT / name).read_text(), flags=re.S)
    return torchrun_lines("\n".join(blocks))


def test_the_slurm_script_is_valid_bash_and_its_torchrun_line_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.fail("bash is needed to check scripts/slurm_train.sbatch")
    done = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = SCRIPT.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "srun " in text
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text
    line, = torchrun_lines(text)
    args, avidfast = _check(line)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id,
            args.max_restarts) == ("4", "8", "c10d", "node001:29500", "4242", 2)
    assert avidfast.config == "avid_s6_audioset" and avidfast.resume == "auto"


def test_every_torchrun_line_of_the_docs_parses():
    lines = _docs_lines()
    assert len(lines) >= 4, lines  # docs: single node, several nodes; README: one node, several nodes
    for line in lines:
        args, avidfast = _check(line)
        if args.nnodes != "1:1" or args.rdzv_backend == "c10d":  # several nodes: restarts continue the run
            assert args.rdzv_backend == "c10d" and args.max_restarts == 2 and avidfast.resume == "auto", line


def test_a_broken_torchrun_line_is_caught():
    with pytest.raises(SystemExit):
        _check("torchrun --nnodes=4 --max-restarts=two -m avidfast.cli train demo")
    with pytest.raises(SystemExit):
        _check("torchrun --nproc-per-node=8 -m avidfast.cli train demo --resume sometimes")
