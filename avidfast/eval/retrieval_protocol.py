"""`avidfast eval retrieval`: cross-modal retrieval and k-NN of a checkpoint, from its path to results.json.

:func:`run_retrieval` reads the held-out manifest (and, for k-NN, a labelled training manifest),
takes the clip shape and audio preset from the checkpoint's training config (each overridable;
required for reference checkpoints), embeds evenly spaced centre-cropped clips of every video with
the checkpoint's networks (each process its share under torchrun, gathered with
:func:`avidfast.distributed.all_gather_rows`), scores them with
:func:`~avidfast.eval.retrieval.evaluate_retrieval` and writes results.json (rank 0).

Class indices of k-NN are positions in the training manifest's ``Manifest.classes``. Errors name
the settings as the command line's options (``--manifest``, ``--train-manifest``, ``--frames``,
``--audio-stats``, ``--device``), since the command passes them through unchanged.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from avidfast.data.manifest import Manifest
from avidfast.errors import AvidfastError, EvalError
from avidfast.eval.retrieval import ClipEmbeddings, RetrievalResult


@dataclass
class RetrievalSettings:
    """What `avidfast eval retrieval` runs (its options, one field each)."""

    checkpoint: str  # avidfast checkpoint or a released reference one
    manifest: str  # held-out videos (queries and candidates)
    train_manifest: Optional[str] = None  # labelled videos the k-NN classifier searches (None: retrieval only)
    root: Optional[str] = None  # folder the manifests' relative paths start from (None: each manifest's)
    random_init: bool = False  # the same architecture with fresh weights (the baseline)
    trust: bool = False  # allow a full unpickle of a reference checkpoint
    clips_per_video: int = 1  # evenly spaced clips per video
    batch: int = 32  # clips per batch and process
    workers: int = 2  # DataLoader workers per process
    ks: Sequence[int] = (1, 5, 10)  # the k of recall@k
    knn_k: int = 20  # neighbours of the k-NN classifier
    knn_temperature: float = 0.07  # k-NN vote weights exp(similarity / T)
    frames: Optional[int] = None  # frames per clip (None: the checkpoint's training config)
    fps: Optional[float] = None  # frame rate of the clips (None: the training config's)
    crop: Optional[int] = None  # square crop in pixels (None: the training config's)
    audio_preset: Optional[str] = None  # table5 or table6 (None: the training config's)
    audio_stats: Optional[str] = None  # .npz of `avidfast stats`, or "none" (None: the training config's)
    seed: int = 0  # seed of random_init
    device: str = "auto"  # auto, cpu or cuda[:N]
    progress: bool = True  # progress bars (rank 0)
    name: Optional[str] = None  # run name (None: retrieval)
    out: Optional[str] = None  # run folder (None: runs/eval/NAME, runs/eval/NAME-random for random_init)
    overwrite: bool = False  # replace the evaluation a run folder already holds (else refused)
    video_only: bool = False  # no sound read or needed: the video k-NN only (train_manifest required)


def _data_section(s: RetrievalSettings, pretrained):
    """The EvalDataSection of the run: clip shape and audio preset / stats from the checkpoint's
    training config, each overridable by a setting (required for reference checkpoints)."""
    from avidfast.config import AudioSection
    from avidfast.eval.config import EvalDataSection

    data = EvalDataSection(train_manifest=s.train_manifest, test_manifest=s.manifest, root=s.root,
                           workers=s.workers, clips_per_video=s.clips_per_video)
    trained = pretrained.train_config
    if trained is None:
        needed = (("--frames", s.frames), ("--crop", s.crop)) + ((("--audio-preset", s.audio_preset),)
                                                                  if not s.video_only else ())
        missing = [name for name, value in needed if value is None]
        if missing:
            raise EvalError(f"--checkpoint {s.checkpoint}: a reference checkpoint holds no training config to "
                            f"take the clip shape from; pass {', '.join(missing)} (Table 5 networks: --frames 16 "
                            "--crop 112 --audio-preset table5; Table 6: --frames 8 --crop 224 --audio-preset table6)")
        video, audio = data.video, AudioSection()
    else:
        video, audio = trained.data.video, trained.data.audio
    data.video = dataclasses.replace(data.video, frames=s.frames or video.frames, fps=s.fps or video.fps,
                                     crop=s.crop or video.crop)
    stats, stats_from = audio.stats, "the checkpoint's training config (data.audio.stats)"
    if s.audio_stats is not None:
        stats, stats_from = (None if s.audio_stats.lower() == "none" else s.audio_stats), "--audio-stats"
    if s.video_only:  # no sound is read
        stats = None
    if stats is not None and not os.path.isfile(stats):
        raise EvalError(f"{stats_from}: spectrogram statistics {stats}: no such file; pass --audio-stats PATH "
                        "(or --audio-stats none to skip the normalisation)")
    data.audio = AudioSection(preset=s.audio_preset or audio.preset, stats=stats)
    return data


def _check_audio(manifest: Manifest, option: str, path: str) -> None:
    """Refuses a manifest whose first video has no readable audio stream (retrieval needs both)."""
    from avidfast.data.probe import probe

    found = probe(manifest.audio_path(0), check="header")
    if found.error or not found.has_audio:
        reason = found.error or "no audio stream"
        raise EvalError(f"{option} {path}: row 1 ({manifest.rows[0]['path']}): {reason}; retrieval needs the sound "
                        "of every video (`avidfast prepare` rejects files without audio)")


def _classes(train: Optional[Manifest], test: Manifest, s: RetrievalSettings) -> Optional[List[str]]:
    """The class list of k-NN (the training manifest's ``classes``), after checking both manifests' labels."""
    from avidfast.data.manifest import ManifestError

    if train is None:
        return None
    for manifest, option, path in ((train, "--train-manifest", s.train_manifest), (test, "--manifest", s.manifest)):
        if not manifest.has_labels:
            raise EvalError(f"{option} {path}: k-NN needs a 'label' on every row (leave out --train-manifest "
                            "for retrieval only)")
    try:
        test.label_indices(train.classes)
    except ManifestError as error:
        raise ManifestError(f"--manifest {s.manifest}: {error}") from None
    return train.classes


def _embed(model, loader, run, progress: bool, audio: bool) -> ClipEmbeddings:
    """Every process's clip embeddings of ``loader`` (its share), concatenated in rank order on every
    process (video only, ``audio`` None, unless ``audio``)."""
    from avidfast.distributed import all_gather_rows
    from avidfast.eval.retrieval import embed_clips

    mine = embed_clips(model, loader, run.device, progress, audio=audio)
    tensors = [mine.video, mine.index] + ([mine.audio] if audio else []) + ([] if mine.label is None else [mine.label])
    gathered = all_gather_rows(tensors)
    video, index = gathered[0], gathered[1]
    rest = gathered[2:]
    sound = rest.pop(0) if audio else None
    return ClipEmbeddings(video, sound, index, rest[0] if rest else None)


def run_retrieval(settings: RetrievalSettings) -> Optional[RetrievalResult]:
    """Cross-modal recall@k of the held-out videos and, with ``train_manifest``, weighted k-NN top-1
    from the labelled training videos, for ``settings.checkpoint``. Writes the run folder and
    results.json and prints the table (rank 0). Returns the :class:`RetrievalResult` on rank 0,
    ``None`` on the other ranks.

    Raises ManifestError, PretrainedError, EvalError (labels, audio, clip shape, statistics, device,
    embeddings), TooManyBadSamples or SampleFailed, each naming the input at fault.
    """
    from avidfast.data.manifest import check_files_exist, read_manifest
    from avidfast.eval.config import EvalConfig, EvalOptimSection
    from avidfast.eval.data import resolve_device
    from avidfast.checkpoints.pretrained import load_pretrained
    from avidfast.eval.run import check_run_dir, default_run_dir, start_run

    s = settings
    run_dir = s.out or default_run_dir(s.name or "retrieval", s.random_init)
    check_run_dir(run_dir, s.overwrite, "--name or --out")  # before the videos are probed
    test = read_manifest(s.manifest, s.root)
    check_files_exist(test, f"--manifest {s.manifest}", "--root")
    train = read_manifest(s.train_manifest, s.root) if s.train_manifest else None
    if train is not None:
        check_files_exist(train, f"--train-manifest {s.train_manifest}", "--root")
    classes = _classes(train, test, s)
    if s.video_only and train is None:
        raise EvalError("--video-only scores the video k-NN alone, which needs labelled training videos: give "
                        "--train-manifest LABELLED")
    if not s.video_only:
        _check_audio(test, "--manifest", s.manifest)
        if train is not None:
            _check_audio(train, "--train-manifest", s.train_manifest)
    resolve_device(s.device, "--device")
    pretrained = load_pretrained(s.checkpoint, random_init=s.random_init, seed=s.seed, trust=s.trust)
    cfg = EvalConfig(name=s.name or "retrieval", seed=s.seed, out_dir=s.out, data=_data_section(s, pretrained),
                     optim=EvalOptimSection(batch_size=s.batch))
    run_settings = {"protocol": "retrieval", "checkpoint": s.checkpoint, "random_init": s.random_init,
                    "ks": list(s.ks), "knn_k": s.knn_k, "temperature": s.knn_temperature, "batch": s.batch,
                    "video_only": s.video_only,
                    "seed": s.seed, "data": dataclasses.asdict(cfg.data)}
    run = start_run(run_dir, run_settings, s.device, "fp32", {"checkpoint": pretrained.info, "protocol": "retrieval"},
                    s.seed, device_option="--device", overwrite=s.overwrite, elsewhere="--name or --out")
    try:
        return _retrieve(s, cfg, pretrained, test, train, classes, run)
    except AvidfastError:
        run.abandon()
        raise


def _retrieve(s: RetrievalSettings, cfg, pretrained, test: Manifest, train: Optional[Manifest],
              classes: Optional[List[str]], run) -> Optional[RetrievalResult]:
    """The embedding and scoring of :func:`run_retrieval`, once its run folder is started."""
    from avidfast.eval.data import test_loader
    from avidfast.eval.retrieval import evaluate_retrieval

    model = pretrained.model.to(run.device)
    progress = s.progress and run.rank == 0
    embedded = {}
    for key, manifest, option, path in (("test", test, "--manifest", s.manifest),
                                        ("train", train, "--train-manifest", s.train_manifest)):
        if manifest is not None:
            loader = test_loader(cfg, manifest, classes, run.rank, run.world, audio=not s.video_only)
            if len(loader) == 0:
                raise EvalError(f"{option} {path}: {len(manifest) * s.clips_per_video} clips leave process "
                                f"{run.rank} of {run.world} none; run fewer processes")
            embedded[key] = _embed(model, loader, run, progress, audio=not s.video_only)
    if run.rank != 0:
        return None
    for key, clips in embedded.items():
        if not (clips.video.isfinite().all() and (clips.audio is None or clips.audio.isfinite().all())):
            raise EvalError(f"--checkpoint {s.checkpoint}: its embeddings of the {key} clips hold NaN or infinite "
                            "values")
    result = evaluate_retrieval(embedded["test"], embedded.get("train"), s.ks, s.knn_k, s.knn_temperature,
                                len(classes) if classes else None, run.device)
    what = "random-init" if s.random_init else "trained"
    table = f"retrieval ({what} {s.checkpoint})\n{result.format()}"
    run.finish({"protocol": "retrieval", "checkpoint": pretrained.info, "classes": classes, **result.to_dict()}, table)
    return result
