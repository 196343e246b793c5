"""Manifest scale check: an AudioSet-sized manifest read, validated, ordered for many ranks and written.

Generates a manifest of ``--rows`` rows (paths, a label of 527 classes and the metadata columns
``avidfast prepare`` writes), then runs each phase in a fresh child process so that each has its
own peak resident set size (ru_maxrss):

* ``generate``: build the rows and write the CSV (the starting point, timed too);
* ``read``: ``read_manifest``;
* ``validate``: what a training run checks: classes and label indices, the manifest fingerprint,
  repeated paths, metadata present and positive;
* ``order``: the epoch's sampler on every one of ``--ranks`` ranks (each rank computes the epoch
  order and iterates its share, as a rank process does), then all ranks' shares as views of one
  order;
* ``write``: ``write_manifest`` of the rows read.

Phases after ``read`` include reading the manifest in their RSS (the rows must be in memory) but
not in their seconds. Prints one line per phase (wall seconds, CPU seconds of the process,
peak RSS in MiB) and the targets (< 30 s, < 1 GiB each).

    python scripts/manifest_scale.py --rows 2000000 --ranks 64 --folder /tmp/manifest-scale
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

PHASES = ("generate", "read", "validate", "order", "write")


def _generate(path: str, rows: int) -> None:
    from avidfast.data.manifest import write_manifest

    def row(i: int) -> dict:
        return {"path": f"videos/{i // 1000:04d}/{i:08d}_{i * 7919 % 1000003:07d}.mp4", "label": f"/m/{i % 527:05x}",
                "duration": 10.0, "fps": 25.0, "width": 340, "height": 256, "sample_rate": 48000, "channels": 2,
                "audio_duration": 9.98, "audio_path": f"audio/{i // 1000:04d}/{i:08d}.wav"}

    class Rows:  # rows made on the fly: the generator itself stays small
        columns = ["path", "label", "duration", "fps", "width", "height", "sample_rate", "channels",
                   "audio_duration", "audio_path"]

        def __len__(self):
            return rows

        def __iter__(self):
            return (row(i) for i in range(rows))

    write_manifest(path, Rows(), columns=Rows.columns)


def _validate(manifest) -> None:
    import numpy as np

    from avidfast.data.manifest import manifest_fingerprint

    labels = manifest.label_indices()
    assert len(labels) == len(manifest) and len(manifest.classes) == 527
    manifest_fingerprint(manifest)
    paths = manifest.column("path")
    if len(set(paths)) != len(paths):
        raise SystemExit("repeated paths")
    for name in ("duration", "width", "height", "audio_duration"):
        values = np.array([np.nan if v is None else v for v in manifest.column(name)], dtype=np.float64)
        if not (values > 0).all():
            raise SystemExit(f"column {name}: missing or non-positive values")


def _order(rows: int, ranks: int) -> None:
    from avidfast.data.sampling import ShardedEpochSampler, epoch_order

    total = 0
    for rank in range(ranks):
        sampler = ShardedEpochSampler(rows, rank=rank, world_size=ranks, seed=0)
        sampler.set_epoch(3)
        total += sum(1 for _ in sampler)
    assert total == -(-rows // ranks) * ranks
    order = epoch_order(rows, 3, 0)
    views = [ShardedEpochSampler(rows, rank=r, world_size=ranks, seed=0).rank_order(order) for r in range(ranks)]
    assert sum(v.numel() for v in views) == total


def _child(phase: str, path: str, rows: int, ranks: int) -> None:
    from avidfast.data.manifest import read_manifest, write_manifest

    manifest = None
    if phase not in ("generate", "read", "order"):
        manifest = read_manifest(path)
    wall, cpu = time.perf_counter(), time.process_time()
    if phase == "generate":
        _generate(path, rows)
    elif phase == "read":
        assert len(read_manifest(path)) == rows
    elif phase == "validate":
        _validate(manifest)
    elif phase == "order":
        _order(rows, ranks)
    else:
        write_manifest(path + ".out.csv", manifest.rows, columns=manifest.columns)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{phase:9s} {wall:7.1f} s wall {cpu:7.1f} s cpu {peak:8.0f} MiB peak RSS", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="manifest rows")
    parser.add_argument("--ranks", type=int, default=64, help="ranks the epoch is shared among")
    parser.add_argument("--folder", help="where the CSV files go (None: a temporary folder, removed at the end; "
                                         "the files are about 370 MB for 2M rows)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # one phase, in a child process
    args = parser.parse_args()
    if args.phase:
        _child(args.phase, os.path.join(args.folder, f"manifest-{args.rows}.csv"), args.rows, args.ranks)
        return
    temporary = args.folder is None
    if temporary:
        args.folder = tempfile.mkdtemp(prefix="avidfast-manifest-scale-")
    os.makedirs(args.folder, exist_ok=True)
    try:
        _run_phases(args, path=os.path.join(args.folder, f"manifest-{args.rows}.csv"))
    finally:
        if temporary:
            shutil.rmtree(args.folder, ignore_errors=True)


def _run_phases(args: argparse.Namespace, path: str) -> None:
    print(f"{args.rows} rows, {args.ranks} ranks; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for phase in PHASES:
        subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--ranks", str(args.ranks),
                        "--folder", args.folder, "--phase", phase], check=True)
    print(f"CSV size {os.path.getsize(path) / 2**20:.0f} MiB; targets: < 30 s and < 1024 MiB per phase")


if __name__ == "__main__":
    main()
