#!/usr/bin/env bash
# Tests avidfast as users install it: the built wheel in a fresh virtual environment, used from a
# folder outside the checkout. Called by `make wheel-check` (and so by .ci/run).
#
# Usage: scripts/wheel_check.sh WHEEL [PYTHON] [TORCH_SPEC]
#   WHEEL       the avidfast wheel to install (built by `make wheel`)
#   PYTHON      the interpreter to create the venv with (default: python3)
#   TORCH_SPEC  the torch the wheel was built against (default: torch==2.13.0)
set -euo pipefail
wheel=$(realpath "$1")
python=${2:-python3}
torch_spec=${3:-torch==2.13.0}
work=$(mktemp -d "${TMPDIR:-/tmp}/avidfast-wheel-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { printf '\n== wheel-check: %s\n' "$*"; }

step "fresh venv in $work/venv; install $torch_spec and $(basename "$wheel")"
"$python" -m venv "$work/venv"
bin=$work/venv/bin
"$bin/pip" install -q --disable-pip-version-check "$torch_spec" "$wheel" 2>&1 | grep -v '^WARNING: Location' || true
"$bin/python" -c "import avidfast" >/dev/null 2>&1 || { echo "wheel-check: avidfast did not install"; exit 1; }

mkdir "$work/user" && cd "$work/user"   # a folder with no source tree in sight
step "the package comes from the venv, not from a checkout"
"$bin/python" - "$work/venv" <<'PY'
import os, sys, torch, avidfast, avidfast._C
root = os.path.realpath(sys.argv[1])
for module in (avidfast, avidfast._C):
    path = os.path.realpath(module.__file__)
    assert path.startswith(root), f"{module.__name__} imported from {path}, outside the venv {root}"
print("avidfast from", os.path.dirname(os.path.realpath(avidfast.__file__)))
PY

step "avidfast --version, avidfast info"
"$bin/avidfast" --version
"$bin/avidfast" info

step "--help of every command"
"$bin/python" - <<'PY'
import argparse, subprocess, sys, os
from avidfast.cli import build_parser

def commands(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, prefix + (name,))

exe = os.path.join(os.path.dirname(sys.executable), "avidfast")
count = 0
for words in commands(build_parser()):
    out = subprocess.run([exe, *words, "--help"], capture_output=True, text=True)
    if out.returncode != 0 or "usage:" not in out.stdout:
        sys.exit(f"`avidfast {' '.join(words)} --help` failed (rc {out.returncode}): {out.stderr}")
    count += 1
print(f"{count} commands answer --help")
PY

step "the operators on a small bank, against the references"
"$bin/python" - <<'PY'
import torch
import avidfast.ops as ops
from avidfast.ops import reference
torch.manual_seed(0)
memory = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
video = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
x = torch.nn.functional.normalize(torch.randn(16, 32), dim=1).requires_grad_()
pos = torch.randint(0, 500, (16,))
neg = ops.sample_negatives(pos, 500, 64, seed=3, step=1)
assert neg.shape == (16, 64) and not (neg == pos[:, None]).any()
torch.testing.assert_close(ops.memory_scores(x, memory, neg, 0.07), reference.memory_scores(x, memory, neg, 0.07))
loss = ops.nce_memory_loss(x, memory, pos, neg, 0.07, 0.01)
expected = reference.nce_memory_loss(x, memory, pos[:, None], neg, 0.07, 0.01)
torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
loss.backward()
assert torch.isfinite(x.grad).all()
values, indices = ops.cma_topk(video, memory, 8, "consensus")
ref_values, ref_indices = reference.cma_topk(video, memory, 8, "consensus")
torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
bank = memory.clone()
ops.memory_update_(bank, pos, x.detach(), 0.5)
torch.testing.assert_close(bank.norm(dim=1), torch.ones(500))
print("sample_negatives, memory_scores, nce_memory_loss (+ backward), cma_topk, memory_update_: OK")
PY

step "synthetic -> prepare -> train -> eval, from $PWD"
"$bin/avidfast" synthetic raw --videos 12 --classes 3 --seconds 2.5 --size 64x64 --quiet
"$bin/avidfast" prepare raw/manifest.csv prep --extract-audio wav --quiet
tiny=(--set model.width=4 --set data.video.frames=4 --set data.video.crop=32 --set data.workers=0
      --set optim.batch_size=4 --set loss.num_negatives=4 --set optim.epochs=1
      --set train.progress=false --set train.channels_last=false --set train.precision=fp32
      --set data.manifest=prep/manifest.csv --set out_dir=run)
"$bin/avidfast" train demo "${tiny[@]}"
test -s run/checkpoints/last.pt || { echo "wheel-check: no checkpoint written"; exit 1; }
"$bin/avidfast" eval memory --checkpoint run/checkpoints/last.pt --repeats 2 --epochs 5 --out eval-memory
test -s eval-memory/results.json || { echo "wheel-check: no results.json written"; exit 1; }
step "OK: the installed wheel works from $PWD"
