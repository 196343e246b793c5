"""The tiny Cross-AVID run the training tests share: the overrides that shrink the demo config to
seconds on a CPU, the 8-clip synthetic set they train on, and the config built from both."""
import pytest

from avidfast.config import load_config
from avidfast.data.synthetic import make_dataset

TINY = [
    "model.width=4", "data.video.frames=4", "data.video.crop=32", "data.workers=0", "optim.batch_size=4",
    "loss.num_negatives=4", "optim.epochs=2", "train.progress=false", "train.log_every=1",
    "train.channels_last=false", "train.precision=fp32",
]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """manifest.csv of 8 synthetic clips (2 classes, 2 s, 64 x 48), made once per test module."""
    return make_dataset(str(tmp_path_factory.mktemp("set")), num_videos=8, num_classes=2, seconds=2.0, seed=1,
                        size=(64, 48), workers=1)


def tiny_config(manifest, out_dir, *extra):
    """The demo config with TINY, training on ``manifest`` into ``out_dir``, then ``extra`` overrides."""
    return load_config("demo", TINY + [f"data.manifest={manifest}", f"out_dir={out_dir}", *extra])
