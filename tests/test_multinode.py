"""Many nodes and faults, with the real torchrun on this machine (issue 18).

Two torchrun launches (gloo, c10d rendezvous on 127.0.0.1), each running a list of `avidfast`
commands in tests/multinode_worker.py, which records every step's banks, Z and positives per rank:

1. two nodes (2 agents x 2 processes, one working folder each, no shared files): AVID, then CMA
   from the AVID checkpoint, then a linear evaluation; an evaluation of a checkpoint both nodes hold;
   a training whose data only node A has. Compared with a 1-process run of the same global batch.
2. one node of 2 processes with `--max-restarts 2`: an uninterrupted run, the same run with a worker
   SIGKILLed mid-epoch (torchrun restarts, `--resume auto` continues from the last step
   checkpoint), the same run with SIGTERM to one rank then `--resume auto`, and a NaN on one rank
   (stop, then skip).
Every agent runs in its own session and is killed with its workers when a test ends or fails.
"""
import json
import os
import re
import shutil

import pytest
import torch

from avidfast.checkpoints import store as ckpt
from avidfast.checkpoints.build import build_criterion
from avidfast.config import load_config
from avidfast.data.synthetic import make_dataset
from avidfast.train.loop import train
from avidfast.train.resume import step_checkpoints
from torchrun_agents import run_agents

pytestmark = pytest.mark.slow

TINY = ["model.width=4", "data.video.frames=4", "data.video.crop=32", "data.workers=0", "loss.num_negatives=4",
        "train.progress=false", "train.log_every=1", "train.channels_last=false", "train.precision=fp32",
        "optim.samples_per_epoch=16", "train.collective_timeout=120"]
CMA = ["loss.kind=cma", "loss.num_positives=2", "loss.num_negatives=3", "loss.num_negatives_within=2"]


def _sets(items):
    return [f"--set={item}" for item in items]


def _train(name, *items, resume=None, fault=None):
    command = {"name": name, "argv": ["train", "demo"] + _sets(TINY + list(items))
               + (["--resume", resume] if resume else [])}
    if fault:
        command["fault"] = fault
    return command


def _eval(name, checkpoint, out_dir):
    items = ["data.train_manifest=data/manifest.csv", "data.audio.stats=null", "data.video.frames=4",
             "data.video.crop=32", "data.workers=0", "data.clips_per_video=2", "optim.epochs=1",
             "optim.batch_size=2", "run.progress=false", f"out_dir={out_dir}"]
    return {"name": name, "argv": ["eval", "linear", "demo-linear", f"--checkpoint={checkpoint}"] + _sets(items)}


def _records(folder, name, rank):
    with open(os.path.join(folder, f"{name}.rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _exit(folder, name, rank):
    with open(os.path.join(folder, f"{name}.rank{rank}.exit")) as f:
        return int(f.read())


def _same_state_on_every_rank(folder, name, world):
    """Every rank's banks, Z and positives digests after every step are rank 0's; returns rank 0's records."""
    ranks = [_records(folder, name, r) for r in range(world)]
    assert all(len(r) == len(ranks[0]) for r in ranks), [len(r) for r in ranks]
    for records in ranks[1:]:
        for mine, theirs in zip(records, ranks[0]):
            assert (mine["step"], mine["state"]) == (theirs["step"], theirs["state"])
    return ranks[0]


def _touched_rows(before, after):
    """Bank rows (video bank) that differ between two criterion states."""
    return set(torch.nonzero((before["video_memory.memory"] != after["video_memory.memory"]).any(dim=1))
               .flatten().tolist())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("set")), num_videos=8, num_classes=2, seconds=2.0, seed=1,
                        size=(64, 48), workers=1)


def test_two_nodes_train_avid_then_cma_and_evaluate_without_shared_files(media, tmp_path):
    set_dir = os.path.dirname(media)
    nodes = [str(tmp_path / "nodeA"), str(tmp_path / "nodeB")]
    for node in nodes:
        shutil.copytree(set_dir, os.path.join(node, "data"))
    shutil.copytree(set_dir, os.path.join(nodes[0], "only_a"))
    records = str(tmp_path / "records")
    os.makedirs(records)
    common = ["data.manifest=data/manifest.csv", "optim.batch_size=2", "train.checkpoint_every=1",
              "train.keep_step_checkpoints=100", "train.keep_epochs=[1,2]"]
    # the 1-process run with the same global batch (4 ranks x 2 clips); its checkpoint also serves
    # as a file both nodes hold a copy of
    single = train(load_config("demo", TINY + [f"data.manifest={media}", f"out_dir={tmp_path / 'single'}",
                                               "optim.batch_size=8", "train.checkpoint_every=1",
                                               "train.keep_step_checkpoints=100", "train.keep_epochs=[1,2]",
                                               "optim.epochs=2"]))
    assert single.steps == 4
    for node in nodes:
        os.makedirs(os.path.join(node, "copies"))
        shutil.copy(single.checkpoint, os.path.join(node, "copies", "avid.pt"))
    commands = [
        _train("avid", *common, "out_dir=runs/avid", "optim.epochs=2"),
        _train("cma", *common, *CMA, "out_dir=runs/cma", "optim.epochs=1",
               "loss.init_from=runs/avid/checkpoints/last.pt"),
        _eval("eval_sent", "runs/cma/checkpoints/last.pt", "runs/eval_sent"),
        _eval("eval_own", "copies/avid.pt", "runs/eval_own"),
        _train("data_on_a_only", "data.manifest=only_a/manifest.csv", "optim.batch_size=2", "out_dir=runs/x"),
    ]
    agents = run_agents(nodes, 2, commands, timeout=420, env={"STEP_RECORD": records})
    a, b = (agent.output() for agent in agents)
    print(a + "\n" + b)  # the test's output for the record (pytest -s)
    assert [agent.process.returncode for agent in agents] == [0, 0], a + b

    # banks, Z and positive sets identical on every rank after every step
    avid = _same_state_on_every_rank(records, "avid", 4)
    cma = _same_state_on_every_rank(records, "cma", 4)
    assert [r["step"] for r in avid] == [1, 2, 3, 4] and len(cma) == 2
    # rank 0 wrote every checkpoint on node A; node B holds none, and its ranks got them from rank 0
    a_avid = os.path.join(nodes[0], "runs", "avid", "checkpoints")
    assert step_checkpoints(a_avid) == ["step_000000001.pt", "step_000000003.pt"]
    assert not os.path.exists(os.path.join(nodes[1], "runs", "avid", "checkpoints"))
    for rank in (2, 3):
        assert (f"loss.init_from runs/avid/checkpoints/last.pt: this rank ({rank}) has no copy; read rank 0's" in b)
        assert f"--checkpoint runs/cma/checkpoints/last.pt: this rank ({rank}) has no copy" in b
    assert "copies/avid.pt: this rank" not in b  # identical own copies are read from the node's disk
    for name in ("eval_sent", "eval_own"):
        assert [_exit(records, name, r) for r in range(4)] == [0] * 4
        assert os.path.isfile(os.path.join(nodes[0], "runs", name, "results.json"))
    # data that only node A has: every rank stops at the start with the same message
    assert [_exit(records, "data_on_a_only", r) for r in range(4)] == [2] * 4
    lines = [line for line in (a + b).splitlines() if line.startswith("avidfast: error: rank 2 of 4")]
    assert len(lines) == 4 and len(set(lines)) == 1, lines
    assert "manifest only_a/manifest.csv: no such file; every rank stopped" in lines[0], lines[0]

    # the 1-process run of the same global batch: every step reads the same clips (positions
    # 8t..8t+7 of the epoch order: rank r takes r, r + 4, ...), so the same bank rows change; the
    # values differ (BatchNorm statistics per rank; negatives drawn per row of the rank-major batch)
    states = [build_criterion(load_config("demo", TINY + [f"data.manifest={media}"]), 8).state_dict()]
    single_states = list(states)
    names = ["step_000000001.pt", "epoch_0001.pt", "step_000000003.pt", "epoch_0002.pt"]
    for name in names:
        states.append(ckpt.load_checkpoint(os.path.join(a_avid, name))["criterion"])
        single_states.append(ckpt.load_checkpoint(str(tmp_path / "single" / "checkpoints" / name))["criterion"])
    for step in range(1, 5):
        rows = _touched_rows(states[step - 1], states[step])
        assert rows and rows == _touched_rows(single_states[step - 1], single_states[step]), step
    # CMA's positive sets, mined over 4 ranks, equal the 1-process mining of the same banks
    avid_last = ckpt.load_checkpoint(os.path.join(a_avid, "last.pt"))
    cma_cfg = load_config("demo", TINY + CMA + [f"data.manifest={media}", "loss.init_from=x"])
    alone = build_criterion(cma_cfg, 8, {"criterion": avid_last["criterion"]})
    alone.mine_positives(epoch=0, progress=False)
    cma_state = ckpt.load_checkpoint(os.path.join(nodes[0], "runs", "cma", "checkpoints", "last.pt"))["criterion"]
    assert torch.equal(cma_state["positives"], alone.positives)


def test_lost_worker_sigterm_and_nan_under_torchrun(media, tmp_path):
    node = str(tmp_path / "node")
    shutil.copytree(os.path.dirname(media), os.path.join(node, "data"))
    records = str(tmp_path / "records")
    os.makedirs(records)
    # 2 processes x 2 clips, 16 clips an epoch: 4 steps an epoch, 8 in all; a step checkpoint every 2
    run = ["data.manifest=data/manifest.csv", "optim.batch_size=2", "optim.epochs=2", "train.checkpoint_every=2",
           "train.keep_step_checkpoints=1"]
    commands = [
        _train("straight", *run, "out_dir=runs/straight", resume="auto"),
        _train("killed", *run, "out_dir=runs/killed", resume="auto", fault={"kind": "kill", "rank": 1, "step": 3}),
        _train("term", *run, "out_dir=runs/term", fault={"kind": "term", "rank": 1, "step": 3}),
        _train("term_resumed", *run, "out_dir=runs/term", resume="auto"),
        _train("nan_stop", *run, "out_dir=runs/nan_stop", "optim.epochs=1", "train.checkpoint_every=1",
               fault={"kind": "nan", "rank": 1, "step": 2}),
        _train("nan_skip", *run, "out_dir=runs/nan_skip", "optim.epochs=1", "train.non_finite=skip",
               fault={"kind": "nan", "rank": 1, "step": 2}),
    ]
    agent, = run_agents([node], 2, commands, timeout=420, max_restarts=2, env={"STEP_RECORD": records})
    output = agent.output()
    print(output)
    assert agent.process.returncode == 0, output
    runs = os.path.join(node, "runs")

    def final(name):
        return ckpt.load_checkpoint(os.path.join(runs, name, "checkpoints", "last.pt"))

    def metrics(name):  # step, epoch, loss, lr (not the speed)
        with open(os.path.join(runs, name, "metrics.csv")) as f:
            return [line.split(",")[:4] for line in f.read().splitlines()]

    straight = final("straight")
    straight_losses = {r["step"]: r["loss"] for r in _same_state_on_every_rank(records, "straight", 2)}
    assert sorted(straight_losses) == list(range(1, 9))

    # 1. SIGKILL of rank 1 after step 3: torchrun restarted both workers, which resumed from step 2
    killed = _same_state_on_every_rank(records, "killed", 2)
    assert [(r["attempt"], r["step"]) for r in killed] == [(0, 1), (0, 2), (0, 3)] + [(1, s) for s in range(3, 9)]
    assert "failed (exitcode: -9) local_rank: 1" in output  # torchrun saw the SIGKILL, then restarted both
    assert all(r["loss"] == straight_losses[r["step"]] for r in killed)  # bit for bit, every step, both attempts
    _assert_same_run(final("killed"), straight)
    assert metrics("killed") == metrics("straight")
    assert step_checkpoints(os.path.join(runs, "killed", "checkpoints")) == ["step_000000006.pt"]  # pruned

    # 2. SIGTERM to rank 1 after step 3: both ranks stop there with one checkpoint, then resume exactly
    assert [_exit(records, "term", r) for r in range(2)] == [143, 143]
    term = _records(records, "term", 0)
    assert [r["step"] for r in term] == [1, 2, 3]
    resumed = _same_state_on_every_rank(records, "term_resumed", 2)
    assert [r["step"] for r in resumed] == list(range(4, 9))
    assert all(r["loss"] == straight_losses[r["step"]] for r in term + resumed)
    _assert_same_run(final("term"), straight)

    # 3. NaN on rank 1 at step 2: stop names the step and the rank on both ranks; nothing after step 1 kept
    assert [_exit(records, "nan_stop", r) for r in range(2)] == [2, 2]
    stop = re.findall(r"avidfast: error: non-finite.*?skip such steps", output)  # one per rank
    assert len(stop) == 2 and all("at step 2 (epoch 1, batch 2; reported by rank" in line for line in stop)
    assert all("non-finite loss" in line and "on rank 1" in line for line in stop), stop
    kept = final("nan_stop")
    assert int(kept["criterion"]["step"]) == 1 and not ckpt.non_finite_tensors(kept)
    # skip: the step changes nothing on any rank (banks, Z), is counted, and the run goes on
    skip = _same_state_on_every_rank(records, "nan_skip", 2)
    assert [(r["step"], r["applied"]) for r in skip] == [(1, True), (1, False), (2, True), (3, True)]
    assert skip[1]["state"] == skip[0]["state"]
    done = final("nan_skip")
    assert done["skipped_steps"] == 1 and not ckpt.non_finite_tensors(done)
    assert "step skipped (1 in a row, 1 in this run)" in output


def _assert_same_run(a, b):
    for part in ("model", "criterion"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert (a["epoch"], a["batches_done"]) == (b["epoch"], b["batches_done"])
    assert json.dumps(a["optimizer"]["param_groups"]) == json.dumps(b["optimizer"]["param_groups"])
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"optimizer {index} {key}"

