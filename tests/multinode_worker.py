"""A torchrun worker for tests/test_multinode.py: runs `avidfast` commands one after another in one
process (one process group), records what every training step left on this rank, and injects
faults.

argv[1]: a JSON list of commands, each {"name": ..., "argv": [arguments of `avidfast`], "fault":
optional {"kind": "kill" | "term" | "nan", "rank": R, "step": S}}. Records go to the folder
``$STEP_RECORD``:
- ``<name>.rank<R>.jsonl``: after every training step, one JSON line: the torchrun restart count,
  the loss's global step, whether the step was applied, the step's loss (a Python float) and
  SHA-256 digests of the banks, Z and positives;
- ``<name>.rank<R>.exit``: the command's exit status (0, 2 for a refused input, 128 + signal).
A fault fires once (a marker file remembers it across torchrun restarts), on rank R at global step
S: ``kill`` (SIGKILL to this worker after the step), ``term`` (SIGTERM to this worker after the
step), ``nan`` (the step's video clips become NaN). Commands run on after a failed one: an agreed
stop leaves the process group usable.
"""
import hashlib
import json
import os
import signal
import sys

import torch

RECORD = os.environ["STEP_RECORD"]
RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
CURRENT = {"name": None, "fault": None}


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _armed(step: int) -> bool:
    """Whether the current command's fault fires on this rank at global step ``step`` (then once)."""
    fault = CURRENT["fault"]
    if not fault or fault["rank"] != RANK or fault["step"] != step:
        return False
    marker = os.path.join(RECORD, f"{CURRENT['name']}.fault-fired")
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


def _install_recorder() -> None:
    from avidfast.train import step as step_module

    original = step_module.TrainStep.__call__

    def recorded(self, batch):
        step = int(self.criterion.step) + 1
        fire = _armed(step)
        kind = CURRENT["fault"]["kind"] if fire else None
        if kind == "nan":
            batch = dict(batch, video=torch.full_like(batch["video"], float("nan")))
        result = original(self, batch)
        state = self.criterion.state_dict()
        line = {"attempt": ATTEMPT, "step": int(self.criterion.step), "applied": bool(result.applied),
                "loss": float(result.loss), "state": {key: _digest(value) for key, value in sorted(state.items())
                                                      if key.endswith("memory") or key in ("Z", "positives")}}
        with open(os.path.join(RECORD, f"{CURRENT['name']}.rank{RANK}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
        if kind in ("kill", "term"):
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        return result

    step_module.TrainStep.__call__ = recorded


def main() -> int:
    torch.set_num_threads(1)
    _install_recorder()
    from avidfast.cli import main as avidfast_main

    for command in json.loads(sys.argv[1]):
        CURRENT.update(name=command["name"], fault=command.get("fault"))
        try:
            code = avidfast_main(command["argv"])
        except SystemExit as done:  # `avidfast train` exits 128 + signal after a signal's checkpoint
            code = done.code
        with open(os.path.join(RECORD, f"{command['name']}.rank{RANK}.exit"), "w") as f:
            f.write(f"{code}\n")
        print(f"worker rank {RANK}: {command['name']} exited {code}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
