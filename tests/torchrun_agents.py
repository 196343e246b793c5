"""torchrun agents on this machine for the multi-node tests: each agent is one "node" with its own
working folder, all joined by a c10d rendezvous on 127.0.0.1 (gloo).

Every agent runs in its own session; torchrun starts each worker in a session of its own too, so
when a test ends or fails the agents' process trees are read from /proc first, then every agent's
and every worker's process group is killed. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the store
the agent shares with its workers (torch's default), workers restarted after a lost worker can read
the previous attempt's addresses and fail to connect or hang (pytorch/pytorch#135712); the docs'
launch recipes set it too."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multinode_worker.py")
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Agent:
    """One torchrun agent (a node): its folder, process and combined output."""

    folder: str
    process: subprocess.Popen
    log: str

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def torchrun_command(nnodes: int, nproc: int, port: int, max_restarts: int = 0) -> List[str]:
    """The torchrun command line of one agent (python -m torch.distributed.run)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=avidfast-test",
            "--rdzv-conf=join_timeout=120", "--local-addr=127.0.0.1", f"--max-restarts={max_restarts}",
            "--monitor-interval=0.5"]


def run_agents(folders: Sequence[str], nproc: int, commands: List[List[str]], *, timeout: float,
               max_restarts: int = 0, env: Optional[Dict[str, str]] = None) -> List[Agent]:
    """Starts one agent per folder (``nnodes = len(folders)``), each running the worker with the
    `avidfast` ``commands``; waits for all (at most ``timeout`` seconds, then kills them and fails);
    returns them, finished. Every agent's process group is killed on the way out, whatever happens."""
    port = free_port()
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
                       PYTHONPATH=SOURCE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    agents: List[Agent] = []
    try:
        for folder in folders:
            log = os.path.join(os.path.dirname(os.path.abspath(folder)), os.path.basename(folder) + ".log")
            with open(log, "w") as out:
                process = subprocess.Popen(
                    torchrun_command(len(folders), nproc, port, max_restarts) + [WORKER, json.dumps(commands)],
                    cwd=folder, env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            agents.append(Agent(folder, process, log))
        deadline = time.monotonic() + timeout
        for agent in agents:
            try:
                agent.process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"torchrun agents still running after {timeout:.0f} s:\n"
                                     + "\n".join(a.output()[-3000:] for a in agents)) from None
        return agents
    finally:
        for agent in agents:
            _kill_group(agent.process)


def _children() -> Dict[int, List[int]]:
    """Parent pid -> child pids of every process visible in /proc."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(name))
    return children


def _descendants(pid: int) -> List[int]:
    children, found, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the agent's process group and to the group of every process below it (torchrun's
    workers run in sessions of their own), then reaps the agent."""
    groups = {process.pid}
    for pid in _descendants(process.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never this test's own group
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def step_records(path_prefix: str, rank: int) -> List[dict]:
    """The worker's per-step records of ``rank`` (multinode_worker.py), in the order written."""
    with open(f"{path_prefix}.rank{rank}.jsonl") as f:
        return [json.loads(line) for line in f]
