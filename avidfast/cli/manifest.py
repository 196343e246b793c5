"""`avidfast manifest ucf101 | hmdb51 | kinetics | audioset`: manifests from published split files."""
import argparse
import os
from typing import List, Sequence

from avidfast.cli.common import UserError


def _refuse_overwrite(out: str, force: bool, sources: Sequence[str]) -> None:
    if os.path.isdir(out):
        raise UserError(f"{out}: is a folder; OUT must be a CSV file name")
    for source in sources:
        if source and os.path.exists(source) and os.path.exists(out) and os.path.samefile(source, out):
            raise UserError(f"{out}: is the input file {source}; choose another OUT")
    if os.path.exists(out) and not force:
        raise UserError(f"{out}: exists; pass --force to overwrite it")


def _write(args: argparse.Namespace, rows: List[dict], columns: Sequence[str], what: str) -> None:
    """Optionally drops rows whose video is missing, writes the manifest and prints one summary line."""
    from avidfast.data.manifest import LABELS_SEPARATOR, write_manifest
    from avidfast.data.splits import drop_missing

    found = ""
    if args.check_dir is not None:
        if not os.path.isdir(args.check_dir):
            raise UserError(f"--check-dir {args.check_dir}: no such folder")
        total = len(rows)
        rows, missing = drop_missing(rows, args.check_dir)
        if not rows:
            raise UserError(f"none of the {total} videos is under {args.check_dir} (first expected: "
                            f"{missing[0]}); is the folder (or --pattern) right?")
        found = (f", {len(missing)} of {total} missing under {args.check_dir} and left out (first: {missing[0]})"
                 if missing else f", all found under {args.check_dir}")
    if "labels" in columns:
        classes = {name for r in rows for name in str(r["labels"]).split(LABELS_SEPARATOR)}
    else:
        classes = {r["label"] for r in rows if "label" in r}
    try:
        write_manifest(args.out, rows, columns=[c for c in columns if any(c in r for r in rows)])
    except OSError as error:
        raise UserError(f"{error.filename or args.out}: {error.strerror or error}") from None
    print(f"{what}: {len(rows)} rows, {len(classes)} classes{found}; wrote {args.out}")


def _ucf101(args: argparse.Namespace) -> None:
    from avidfast.data.splits import SplitFormatError, ucf101_rows

    _refuse_overwrite(args.out, args.force, [])
    try:
        rows = ucf101_rows(args.list_dir, args.fold, args.split)
    except SplitFormatError as error:
        raise UserError(str(error)) from None
    _write(args, rows, ["path", "label"], f"UCF-101 fold {args.fold} {args.split}")


def _hmdb51(args: argparse.Namespace) -> None:
    from avidfast.data.splits import SplitFormatError, hmdb51_rows

    _refuse_overwrite(args.out, args.force, [])
    try:
        rows = hmdb51_rows(args.split_dir, args.fold, args.split)
    except SplitFormatError as error:
        raise UserError(str(error)) from None
    _write(args, rows, ["path", "label"], f"HMDB-51 fold {args.fold} {args.split}")


def _kinetics(args: argparse.Namespace) -> None:
    from avidfast.data.splits import kinetics_rows

    _refuse_overwrite(args.out, args.force, [args.csv])
    try:
        rows = kinetics_rows(args.csv, args.pattern, args.split)
    except ValueError as error:  # SplitFormatError, or a bad --pattern / --split
        raise UserError(str(error)) from None
    _write(args, rows, ["path", "label", "youtube_id", "time_start", "time_end"],
           f"Kinetics {os.path.basename(args.csv)}" + (f" split {args.split}" if args.split else ""))


def _audioset(args: argparse.Namespace) -> None:
    from avidfast.data.splits import audioset_rows, random_rows, read_audioset_classes, read_youtube_ids, rows_of_ids

    _refuse_overwrite(args.out, args.force, [args.csv, args.class_labels, args.subset])
    what = f"AudioSet {os.path.basename(args.csv)}"
    try:
        names = read_audioset_classes(args.class_labels) if args.class_labels else None
        rows = audioset_rows(args.csv, args.pattern, names)
        if args.subset is not None:
            ids = read_youtube_ids(args.subset)
            rows, absent = rows_of_ids(rows, ids)
            if not rows:
                raise UserError(f"--subset {args.subset}: none of its {len(ids)} YouTube ids is in {args.csv} (first: "
                                f"{ids[0]}); is it a list of this CSV's videos?")
            what += (f", the {len(ids)} ids of {args.subset} in its order"
                     + (f" ({len(absent)} not in the CSV and left out, first: {absent[0]})" if absent else ""))
        elif args.subset_size is not None:
            rows = random_rows(rows, args.subset_size, args.seed)
            what += f", a random subset of {args.subset_size} (seed {args.seed})"
    except ValueError as error:  # SplitFormatError, or a bad --pattern / --subset-size
        raise UserError(str(error)) from None
    _write(args, rows, ["path", "labels", "youtube_id", "time_start", "time_end"], what)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="manifest CSV to write (paths relative to the video folder)")
    parser.add_argument("--check-dir", metavar="VIDEO_DIR",
                        help="leave out rows whose video is not under VIDEO_DIR and report how many (None: no check)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def register(commands) -> None:
    """Adds `manifest` (with one subcommand per data set) to the top-level subparsers."""
    from avidfast.data.splits import AUDIOSET_PATTERN, FOLDS, KINETICS_PATTERN, SPLITS

    manifest = commands.add_parser(
        "manifest", help="write a manifest from a data set's published split / annotation files",
        description="Reads the split files of UCF-101 or HMDB-51, a Kinetics CSV or an AudioSet segment "
                    "CSV in the format their authors publish and writes a manifest CSV (atomically) whose "
                    "paths are relative to the data set's video folder, for `avidfast prepare MANIFEST OUT "
                    "--root VIDEO_DIR`. Malformed lines are reported as FILE:LINE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    datasets = manifest.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    ucf = datasets.add_parser(
        "ucf101", help="UCF-101 from ucfTrainTestlist/ (classInd.txt, trainlist0N.txt, testlist0N.txt)",
        description="One fold's train or test list; label = class folder (train lines' class indices are "
                    "checked against classInd.txt). Paths: <Class>/v_<Class>_gXX_cYY.avi.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ucf.add_argument("list_dir", metavar="LIST_DIR", help="the ucfTrainTestlist folder")
    _common(ucf)
    ucf.add_argument("--fold", type=int, choices=FOLDS, default=1, help="official split number")
    ucf.add_argument("--split", choices=SPLITS, default="train", help="which list of the fold")
    ucf.set_defaults(handler=_ucf101)

    hmdb = datasets.add_parser(
        "hmdb51", help="HMDB-51 from testTrainMulti_7030_splits/ (<action>_test_splitN.txt)",
        description="One fold's train (mark 1) or test (mark 2) videos over all actions; mark 0 (unused) is "
                    "skipped; label = action. Paths: <action>/<video>.avi.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hmdb.add_argument("split_dir", metavar="SPLIT_DIR", help="the testTrainMulti_7030_splits folder")
    _common(hmdb)
    hmdb.add_argument("--fold", type=int, choices=FOLDS, default=1, help="official split number")
    hmdb.add_argument("--split", choices=SPLITS, default="train", help="train (mark 1) or test (mark 2)")
    hmdb.set_defaults(handler=_hmdb51)

    kin = datasets.add_parser(
        "kinetics", help="Kinetics-400/600/700 annotation CSV (label,youtube_id,time_start,time_end,split)",
        description="Every row of the CSV (or of one --split); label column when the CSV has labels (test "
                    "CSVs may not); also youtube_id, time_start, time_end. File names come from --pattern, "
                    "a Python format string with fields {youtube_id}, {time_start}, {time_end} (int "
                    "seconds), {split}, {label}, {label_underscored} (spaces as _) and {label_or_split}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    kin.add_argument("csv", metavar="CSV", help="annotation CSV, e.g. train.csv or validate.csv")
    _common(kin)
    kin.add_argument("--pattern", default=KINETICS_PATTERN, help="file name of a clip, relative to the video folder")
    kin.add_argument("--split", help="keep only rows with this value in the split column (None: all rows)")
    kin.set_defaults(handler=_kinetics)

    aus = datasets.add_parser(
        "audioset", help="AudioSet segment CSV (e.g. balanced_train_segments.csv)",
        description="Every segment of the CSV, multi-label: column 'labels' holds the segment's classes "
                    "joined by ';' (MIDs, or display names with --class-labels); also youtube_id, "
                    "time_start, time_end. File names come from --pattern, a Python format string with "
                    "fields {youtube_id}, {start_ms}, {end_ms} (int milliseconds), {time_start}, "
                    "{time_end} (float seconds) and {split} (the CSV's name without _segments.csv). "
                    "--subset or --subset-size keep a subset, e.g. the 100 K videos of the paper's sections 4 "
                    "and 5.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    aus.add_argument("csv", metavar="CSV", help="segment CSV")
    _common(aus)
    aus.add_argument("--pattern", default=AUDIOSET_PATTERN, help="file name of a clip, relative to the video folder")
    aus.add_argument("--class-labels", metavar="CSV", help="class_labels_indices.csv to name the classes (None: MIDs)")
    subset = aus.add_mutually_exclusive_group()
    subset.add_argument("--subset", metavar="FILE",
                        help="keep only the videos FILE lists (one YouTube id, or a clip name <id>_<start_ms>_<end_ms>"
                             ".mp4, per line, e.g. the AVID-CMA code's unbalanced_train-100k.txt), in FILE's order "
                             "(None: every segment)")
    subset.add_argument("--subset-size", type=int, metavar="N",
                        help="keep a random subset of N segments drawn with --seed, in the CSV's order (None: every "
                             "segment)")
    aus.add_argument("--seed", type=int, default=0, help="seed of the --subset-size draw")
    aus.set_defaults(handler=_audioset)
