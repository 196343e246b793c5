"""Reading checkpoints of the paper's code (avidfast.checkpoints.reference) and training from them."""
import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avidfast.checkpoints import store as ckpt
from avidfast.checkpoints.reference import (ReferenceCheckpointError, from_reference_state,
                                            is_reference_checkpoint, load_reference_checkpoint)
from avidfast.cli import main as cli_main
from avidfast.losses import AVIDLoss, CMALoss

from conftest import unit_rows


# A network with the reference's module names and nesting (facebookresearch/AVID-CMA:
# models/network_blocks.py BasicR2P1DBlock and Basic2DBlock, models/video.py R2Plus1D(depth=18),
# models/audio.py Conv2D, models/av_wrapper.py AV_Wrapper / Head), written here from those facts
# at any width, so that its state dict is a reference-layout file and its outputs the reference's.
class RefR2P1DBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.spt_conv1 = nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.spt_bn1 = nn.BatchNorm3d(cout)
        self.tmp_conv1 = nn.Conv3d(cout, cout, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False)
        self.tmp_bn1 = nn.BatchNorm3d(cout)
        self.spt_conv2 = nn.Conv3d(cout, cout, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.spt_bn2 = nn.BatchNorm3d(cout)
        self.tmp_conv2 = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.out_bn = nn.BatchNorm3d(cout)
        self.res_conv = nn.Conv3d(cin, cout, 1, stride=stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x):
        y = F.relu(self.tmp_bn1(self.tmp_conv1(F.relu(self.spt_bn1(self.spt_conv1(x))))))
        y = self.tmp_conv2(F.relu(self.spt_bn2(self.spt_conv2(y))))
        return F.relu(self.out_bn(y + (x if self.res_conv is None else self.res_conv(x))))


class RefVideo(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(3, w, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                                   nn.BatchNorm3d(w), nn.ReLU(), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        chans = [w, w, 2 * w, 4 * w, 8 * w]
        for i, name in enumerate(("conv2x", "conv3x", "conv4x", "conv5x")):
            stride = 1 if i == 0 else 2
            self.add_module(name, nn.Sequential(RefR2P1DBlock(chans[i], chans[i + 1], stride),
                                                RefR2P1DBlock(chans[i + 1], chans[i + 1])))

    def forward(self, x):
        x = self.conv5x(self.conv4x(self.conv3x(self.conv2x(self.conv1(x)))))
        return x.amax(dim=(2, 3, 4))


class RefBlock2D(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class RefAudio(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, w, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1 = RefBlock2D(w, w, 2)
        self.block2 = RefBlock2D(w, 2 * w, 2)
        self.block3 = RefBlock2D(2 * w, 4 * w, 2)
        self.block4 = RefBlock2D(4 * w, 8 * w, 1)

    def forward(self, x):  # x: (B, 1, T, F), the reference's spectrogram layout
        return self.block4(self.block3(self.block2(self.block1(self.conv1(x))))).amax(dim=(2, 3))


class RefHead(nn.Module):
    def __init__(self, cin, dims):
        super().__init__()
        layers = []
        for i, d in enumerate(dims):
            layers += [nn.Linear(cin, d)] + ([nn.ReLU()] if i < len(dims) - 1 else [])
            cin = d
        self.projection = nn.Sequential(*layers)

    def forward(self, x):
        return self.projection(x)


class RefAVWrapper(nn.Module):
    def __init__(self, w, proj_dims=(None, None, 128)):
        super().__init__()
        dims = [8 * w if d is None else d for d in proj_dims]
        self.video_model, self.audio_model = RefVideo(w), RefAudio(w)
        self.video_proj, self.audio_proj = RefHead(8 * w, dims), RefHead(8 * w, dims)

    def forward(self, video, audio_tf):
        return self.video_proj(self.video_model(video)), self.audio_proj(self.audio_model(audio_tf))


def _randomise(module: nn.Module) -> nn.Module:
    """Fresh random values in every parameter and BatchNorm buffer."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(int(torch.randint(1, 1000, ())))
            elif name.endswith("running_var") or (name.endswith(".weight") and tensor.dim() == 1):
                tensor.uniform_(0.5, 1.5)
            elif tensor.dim() > 1:
                tensor.normal_(0, (2.0 / tensor[0].numel()) ** 0.5)
            else:
                tensor.normal_(0, 0.2)
    return module.eval()


def reference_checkpoint(width=4, num_items=8, embed_dim=128, proj_dims=None, partitions=(None,), positives=0):
    """(reference network, checkpoint dict) in the layout the reference's CheckpointManager saves."""
    ref = _randomise(RefAVWrapper(width, proj_dims or (None, None, embed_dim)))
    criterion = {"nce_average.view1_mem": unit_rows(num_items, embed_dim),
                 "nce_average.view2_mem": unit_rows(num_items, embed_dim)}
    for i, z in enumerate(partitions):
        criterion[f"criterion{'' if i == 0 else i}.avg_exp_score"] = torch.tensor(
            float(torch.empty(()).uniform_(1e-4, 1e-2)) if z is None else z)
    if positives:
        criterion["nce_average.positive_set"] = torch.randint(0, num_items, (num_items, positives), dtype=torch.int32)
    state = {"epoch": 200, "model": {f"module.{k}": v.clone() for k, v in ref.state_dict().items()},
             "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.999), "params": [0, 1]}]},
             "train_criterion": criterion}
    return ref, state


def test_reference_layout_loads_and_gives_the_reference_networks_outputs():
    ref, state = reference_checkpoint(width=8, num_items=12)
    model, loss_state, info = from_reference_state(state)
    model.eval()
    inferred = {k: info[k] for k in ("preset", "width", "embed_dim", "head_layers", "hidden", "num_items", "epoch")}
    assert inferred == {"preset": "table6", "width": 8, "embed_dim": 128, "head_layers": 3, "hidden": 64,
                        "num_items": 12, "epoch": 200}
    video = torch.randn(2, 3, 4, 40, 48)
    audio = torch.randn(2, 1, 36, 28)  # avidfast: (B, 1, F, T)
    with torch.no_grad():
        ref_v, ref_a = ref(video, audio.transpose(-1, -2))  # the reference: (B, 1, T, F)
        ours_v = model.video_head(model.video(video))
        ours_a = model.audio_head(model.audio(audio))
        v, a = model(video, audio)
    torch.testing.assert_close(ours_v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_a, ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, F.normalize(ref_v, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, F.normalize(ref_a, dim=1), rtol=1e-5, atol=1e-6)
    # every BatchNorm statistic came across (eval outputs would not show num_batches_tracked)
    tracked = ref.video_model.conv4x[1].out_bn.num_batches_tracked
    assert int(model.video.block4[1].out_bn.num_batches_tracked) == int(tracked)
    assert info["filled"] == [] and "optimizer" in info["not_loaded"]


def test_banks_and_partition_constant_become_avidfast_loss_state():
    _, state = reference_checkpoint(num_items=10, partitions=(0.002, 0.004), positives=3)
    _, loss_state, info = from_reference_state(state)
    crit = state["train_criterion"]
    assert torch.equal(loss_state["video_memory.memory"], crit["nce_average.view1_mem"])
    assert torch.equal(loss_state["audio_memory.memory"], crit["nce_average.view2_mem"])
    assert torch.allclose(loss_state["Z"], torch.full((4,), 0.003)) and info["partition"] == pytest.approx(0.003)
    assert info["kind"] == "AVID_CMA" and "train_criterion.nce_average.positive_set" in info["not_loaded"]
    avid = AVIDLoss(10, 128, num_negatives=4)
    avid.load_state_dict(loss_state)
    assert torch.equal(avid.video_memory.memory, crit["nce_average.view1_mem"])
    assert avid._estimated == {"v2a", "a2v", "v2v", "a2a"}  # Z is fixed, never re-estimated
    cma = CMALoss.from_avid(loss_state, num_negatives=4, num_negatives_within=2, num_positives=2)
    assert torch.equal(cma.audio_memory.memory, crit["nce_average.view2_mem"])
    assert torch.allclose(cma.Z, torch.full((4,), 0.003))


def test_an_unestimated_partition_constant_stays_unestimated():
    _, state = reference_checkpoint(partitions=(-1.0,))
    _, loss_state, info = from_reference_state(state)
    assert info["partition"] is None and bool((loss_state["Z"] < 0).all())


def test_every_unmatched_missing_or_misshaped_key_is_reported():
    _, state = reference_checkpoint()
    model = state["model"]
    del model["module.video_model.conv3x.0.res_conv.weight"]
    model["module.audio_model.block2.bn_1.weight"] = model.pop("module.audio_model.block2.bn1.weight")
    model["module.video_model.extra.weight"] = torch.randn(3)
    model["module.audio_proj.projection.2.bias"] = torch.randn(7)
    with pytest.raises(ReferenceCheckpointError) as caught:
        from_reference_state(state)
    message = str(caught.value)
    for name in ("video_model.conv3x.0.res_conv.weight", "audio_model.block2.bn1.weight",
                 "audio_model.block2.bn_1.weight", "video_model.extra.weight", "audio_proj.projection.2.bias: (7,)"):
        assert name in message, name
    assert "2 key(s) in the file with no avidfast counterpart" in message
    assert "2 key(s) missing" in message and "1 tensor(s) of the wrong shape" in message


def test_criterion_problems_and_other_layouts_are_refused():
    _, state = reference_checkpoint()
    state["train_criterion"]["nce_average.extra"] = torch.ones(2)
    del state["train_criterion"]["nce_average.view2_mem"]
    with pytest.raises(ReferenceCheckpointError, match="unknown.*nce_average.extra.*missing memory bank.*view2_mem"):
        from_reference_state(state)
    _, state = reference_checkpoint()
    state["model"] = {k: v for k, v in state["model"].items() if "_proj." not in k}
    with pytest.raises(ReferenceCheckpointError, match="no projection heads"):
        from_reference_state(state)
    _, state = reference_checkpoint()
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("module.video_model.conv2x.1.")}
    with pytest.raises(ReferenceCheckpointError, match="1 block.*R\\(2\\+1\\)D-18"):
        from_reference_state(state)


def test_linear_heads_and_missing_criterion():
    _, state = reference_checkpoint(width=4, proj_dims=(32,))
    del state["train_criterion"]
    model, loss_state, info = from_reference_state(state)
    assert loss_state is None and (info["head_layers"], info["embed_dim"], info["hidden"]) == (1, 32, None)
    assert model.video_head.num_layers == 1 and model.embed_dim == 32


def test_files_without_num_batches_tracked_load_with_it_reported():
    ref, state = reference_checkpoint()
    state["model"] = {k: v for k, v in state["model"].items() if not k.endswith("num_batches_tracked")}
    model, _, info = from_reference_state(state)
    expected = sorted(k for k in model.state_dict() if k.endswith("num_batches_tracked"))
    assert sorted(info["filled"]) == expected and len(expected) > 0
    assert torch.equal(model.video.conv1.bn.running_var, ref.video_model.conv1[1].running_var)


def test_is_reference_checkpoint_tells_the_layouts_apart(tmp_path):
    _, state = reference_checkpoint()
    assert is_reference_checkpoint(state)
    assert is_reference_checkpoint({"model": {k[len("module."):]: v for k, v in state["model"].items()}})
    from avidfast.models import AVModel

    ours = {"model": AVModel.from_preset("table5", width=4).state_dict(), "criterion": {}}
    assert not is_reference_checkpoint(ours)
    assert not is_reference_checkpoint({"state_dict": state["model"]}) and not is_reference_checkpoint([1, 2])


def test_files_load_weights_only_and_refuse_pickled_objects_unless_trusted(tmp_path):
    _, state = reference_checkpoint()
    plain = tmp_path / "AVID_plain_checkpoint.pth.tar"
    torch.save(state, plain)
    model, loss_state, info = load_reference_checkpoint(str(plain))
    assert info["weights_only"] is True and info["path"] == str(plain) and loss_state is not None
    state["args"] = argparse.Namespace(lr=1e-4)  # a Python object: weights_only=True cannot read it
    pickled = tmp_path / "AVID_pickled_checkpoint.pth.tar"
    torch.save(state, pickled)
    with pytest.raises(ReferenceCheckpointError, match="weights_only=True.*argparse.Namespace.*trust=True"):
        load_reference_checkpoint(str(pickled))
    trusted, _, info = load_reference_checkpoint(str(pickled), trust=True)
    assert info["weights_only"] is False and "args" in info["not_loaded"]
    for a, b in zip(model.state_dict().values(), trusted.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_reference_checkpoint(str(tmp_path / "absent.pth.tar"))
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(plain.read_bytes()[:1000])
    with pytest.raises(ReferenceCheckpointError, match="cannot be read"):
        load_reference_checkpoint(str(truncated), trust=True)


# --- training from a reference checkpoint on the synthetic set -------------------------------------

TINY_CMA = [
    "data.pipeline=cpu", "data.workers=0", "data.video.frames=4", "data.video.crop=32", "data.audio.preset=reference",
    "model.width=4", "optim.batch_size=null", "optim.global_batch_size=4", "optim.epochs=1",
    "optim.samples_per_epoch=null",
    "loss.num_negatives=4", "loss.num_negatives_within=2", "loss.num_positives=2", "loss.resample_every=1",
    "train.precision=fp32", "train.channels_last=false", "train.progress=false", "train.log_every=1",
    "train.keep_epochs=[]",
]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from avidfast.data.synthetic import make_dataset

    return make_dataset(str(tmp_path_factory.mktemp("set")), num_videos=8, num_classes=2, seconds=2.0, seed=3,
                        size=(64, 48), workers=1)


def _sets(*items):
    return [arg for item in items for arg in ("--set", item)]


def test_cma_training_starts_from_a_reference_checkpoint(tiny_set, tmp_path):
    _, state = reference_checkpoint(width=4, num_items=8, partitions=(0.0123,), positives=2)
    path = tmp_path / "AVID_Kinetics_Cross-N1024_checkpoint.pth.tar"
    torch.save(state, path)
    run = tmp_path / "cma"
    code = cli_main(["train", "cma_s6_kinetics", "--init-from-reference", str(path),
                     *_sets(*TINY_CMA, f"data.manifest={tiny_set}", f"out_dir={run}")])
    assert code == 0
    saved = ckpt.load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))
    assert saved["config"]["loss"]["init_from_reference"] == str(path) and saved["config"]["loss"]["init_from"] is None
    assert torch.allclose(saved["criterion"]["Z"], torch.full((4,), 0.0123))  # the reference's Z, kept
    assert bool((saved["criterion"]["positives"] >= 0).all())  # mined from the loaded banks
    reference, _, _ = from_reference_state(state)
    start = reference.state_dict()
    # two Adam steps of lr 2e-4 move each weight by about 4e-4: the run began at the file's weights
    for key, value in saved["model"].items():
        if key.endswith("weight") and value.dim() > 1:
            assert (value - start[key]).abs().max() < 2e-3, key


def test_avid_training_takes_weights_banks_and_partition_from_a_reference_checkpoint(tiny_set, tmp_path):
    from avidfast.config import load_config
    from avidfast.train.loop import TrainingError, train

    _, state = reference_checkpoint(width=4, num_items=8, partitions=(0.0321,))
    path = tmp_path / "AVID_checkpoint.pth.tar"
    torch.save(state, path)
    demo_overrides = TINY_CMA[:-4] + ["loss.num_negatives=4", "model.preset=table6", f"data.manifest={tiny_set}",
                                      f"out_dir={tmp_path / 'avid'}", f"loss.init_from_reference={path}"]
    with pytest.raises(TrainingError, match="with a head input norm.*--set model.head_input_norm=false"):
        train(load_config("demo", demo_overrides))  # the demo config adds a BatchNorm the paper's heads lack
    cfg = load_config("demo", demo_overrides + ["model.head_input_norm=false"])
    result = train(cfg, max_steps=1)
    assert result.steps == 1
    assert torch.allclose(result.criterion.Z, torch.full((4,), 0.0321))


def test_reference_initialisation_refuses_a_different_model_or_manifest(tiny_set, tmp_path):
    from avidfast.config import load_config
    from avidfast.train.loop import TrainingError, train

    _, state = reference_checkpoint(width=8, num_items=8)
    path = tmp_path / "w8.pth.tar"
    torch.save(state, path)
    cfg = load_config("cma_s6_kinetics", TINY_CMA + [f"data.manifest={tiny_set}", f"out_dir={tmp_path / 'a'}",
                                                     "loss.init_from=null", f"loss.init_from_reference={path}"])
    with pytest.raises(TrainingError, match="width 8.*model.width=4.*--set model.width=8"):
        train(cfg)
    _, state = reference_checkpoint(width=4, num_items=9)
    torch.save(state, path)
    cfg = load_config("cma_s6_kinetics", TINY_CMA + [f"data.manifest={tiny_set}", f"out_dir={tmp_path / 'b'}",
                                                     "loss.init_from=null", f"loss.init_from_reference={path}"])
    with pytest.raises(TrainingError, match="9 slots.*8 rows"):
        train(cfg)


def test_eval_linear_and_memory_run_on_a_reference_checkpoint(tiny_set, tmp_path):
    import json

    _, state = reference_checkpoint(width=4, num_items=8, partitions=(0.0123,))
    path = tmp_path / "AVID_Kinetics_Cross-N1024_checkpoint.pth.tar"
    torch.save(state, path)
    out = tmp_path / "linear"
    code = cli_main(["eval", "linear", "demo-linear", "--checkpoint", str(path),
                     *_sets(f"data.train_manifest={tiny_set}", "data.audio.stats=null", "data.workers=0",
                            "data.clips_per_video=1", "optim.epochs=1", "optim.batch_size=2", "optim.milestones=[]",
                            "run.progress=false", f"out_dir={out}")])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["checkpoint"]["preset"] == "table6" and result["checkpoint"]["width"] == 4
    assert result["num_classes"] == 2 and result["num_test_videos"] == 2
    assert set(result["video_top1"]) == {"block1", "block2", "block3", "block4"}  # Table 1's blocks
    assert all(0 <= v <= 1 for v in result["video_top1"].values())
    code = cli_main(["eval", "memory", "--checkpoint", str(path), "--labels", tiny_set, "--epochs", "2",
                     "--out", str(tmp_path / "memory")])
    assert code == 0
    memory = json.loads((tmp_path / "memory" / "results.json").read_text())
    assert len(memory["top1"]["combined"]) == 5


def test_cma_from_an_avidfast_avid_stage_equals_cma_from_the_reference_file_of_it():
    """The same banks and partition constant reach CMA the same way from either file."""
    avid = AVIDLoss(40, 128, num_negatives=8, seed=2)
    for step in range(2):
        avid(torch.randn(6, 128), torch.randn(6, 128), torch.arange(6) + 6 * step)
    ours = avid.state_dict()
    reference = {"nce_average.view1_mem": ours["video_memory.memory"].clone(),
                 "nce_average.view2_mem": ours["audio_memory.memory"].clone(),
                 "criterion.avg_exp_score": ours["Z"][0].clone()}
    _, state = reference_checkpoint(num_items=40)
    state["train_criterion"] = reference
    _, loss_state, _ = from_reference_state(state)
    kwargs = dict(num_negatives=8, num_negatives_within=4, num_positives=3, seed=2)
    from_ours, from_reference = CMALoss.from_avid(ours, **kwargs), CMALoss.from_avid(loss_state, **kwargs)
    assert torch.equal(from_ours.Z, from_reference.Z) and (from_ours.Z == ours["Z"][0]).all()
    from_reference.step.copy_(from_ours.step)  # the reference keeps no step counter; align the draws
    video, audio, index = torch.randn(5, 128), torch.randn(5, 128), torch.arange(5)
    for cma in (from_ours, from_reference):
        cma.mine_positives(progress=False)
    assert torch.equal(from_ours(video, audio, index)[0], from_reference(video, audio, index)[0])
