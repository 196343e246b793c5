"""Dataset adapters: UCF-101 / HMDB-51 split files, Kinetics and AudioSet CSVs -> manifests."""
import os
import re

import pytest

from avidfast.cli import main
from avidfast.data.manifest import read_manifest
from avidfast.data.splits import (SplitFormatError, audioset_rows, drop_missing, hmdb51_rows, kinetics_rows,
                                  random_rows, read_audioset_classes, read_ucf101_classes, ucf101_rows)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(text)
    return str(path)


def assert_names_line(error, path, line):
    assert str(error.value).startswith(f"{path}:{line}: "), str(error.value)


# ----------------------------------------------------------------------------- UCF-101

UCF_CLASSES = "1 ApplyEyeMakeup\r\n2 Archery\r\n3 HandstandPushups\r\n4 YoYo\r\n"  # CRLF, as published
UCF_TRAIN1 = ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
              "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi 1\r\n"
              "Archery/v_Archery_g08_c02.avi 2\r\n"
              "HandstandPushups/v_HandStandPushups_g08_c01.avi 3\r\n"
              "YoYo/v_YoYo_g10_c03.avi 4\r\n")
UCF_TEST1 = ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\n"
             "Archery/v_Archery_g01_c01.avi\r\n"
             "YoYo/v_YoYo_g02_c01.avi\r\n")
UCF_TRAIN2 = "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\nYoYo/v_YoYo_g02_c01.avi 4\n"
UCF_TEST2 = "Archery/v_Archery_g08_c02.avi\nHandstandPushups/v_HandStandPushups_g08_c01.avi\n"


@pytest.fixture
def ucf(tmp_path):
    folder = tmp_path / "ucfTrainTestlist"
    for name, text in [("classInd.txt", UCF_CLASSES), ("trainlist01.txt", UCF_TRAIN1), ("testlist01.txt", UCF_TEST1),
                       ("trainlist02.txt", UCF_TRAIN2), ("testlist02.txt", UCF_TEST2)]:
        write(folder / name, text)
    return str(folder)


def test_ucf101_rows_per_fold_and_split(ucf):
    assert read_ucf101_classes(os.path.join(ucf, "classInd.txt")) == ["ApplyEyeMakeup", "Archery",
                                                                       "HandstandPushups", "YoYo"]
    train = ucf101_rows(ucf, 1, "train")
    assert [r["path"] for r in train] == [line.split()[0] for line in UCF_TRAIN1.splitlines()]
    assert [r["label"] for r in train] == ["ApplyEyeMakeup", "ApplyEyeMakeup", "Archery", "HandstandPushups", "YoYo"]
    test = ucf101_rows(ucf, 1, "test")
    assert [(r["path"], r["label"]) for r in test] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "ApplyEyeMakeup"),
        ("Archery/v_Archery_g01_c01.avi", "Archery"), ("YoYo/v_YoYo_g02_c01.avi", "YoYo")]
    assert [r["label"] for r in ucf101_rows(ucf, 2, "train")] == ["ApplyEyeMakeup", "YoYo"]
    assert [r["label"] for r in ucf101_rows(ucf, 2, "test")] == ["Archery", "HandstandPushups"]
    with pytest.raises(SplitFormatError, match="testlist03.txt: no such file"):
        ucf101_rows(ucf, 3, "test")
    with pytest.raises(ValueError, match="fold must be one of 1, 2, 3"):
        ucf101_rows(ucf, 4, "train")
    with pytest.raises(ValueError, match="split must be one of train, test"):
        ucf101_rows(ucf, 1, "val")


@pytest.mark.parametrize("name, text, line, message", [
    ("classInd.txt", "1 ApplyEyeMakeup\n2 Archery extra\n", 2, "expected '<class index> <class name>', got 3 fields"),
    ("classInd.txt", "1 ApplyEyeMakeup\ntwo Archery\n", 2, "class index 'two' is not an integer"),
    ("classInd.txt", "1 ApplyEyeMakeup\n3 Archery\n", 2, "class index 3 out of order (expected 2"),
    ("classInd.txt", "1 ApplyEyeMakeup\n2 Archery\n1 YoYo\n", 3, "duplicate class index 1 (first on line 1)"),
    ("classInd.txt", "1 ApplyEyeMakeup\n\n2 ApplyEyeMakeup\n", 3, "duplicate class name 'ApplyEyeMakeup' (first on line 1)"),
    ("trainlist01.txt", "Archery/v_Archery_g08_c02.avi\n", 1, "expected '<class>/<video>.avi <class index>', got 1 fields"),
    ("trainlist01.txt", "Archery/v_Archery_g08_c02.avi 2\nYoYo/v_YoYo_g10_c03.avi 4.0\n", 2,
     "class index '4.0' is not an integer"),
    ("trainlist01.txt", "Archery/v_Archery_g08_c02.avi 5\n", 1, "unknown class index 5"),
    ("trainlist01.txt", "Archery/v_Archery_g08_c02.avi 1\n", 1,
     "class index 1 is 'ApplyEyeMakeup' in"),
    ("trainlist01.txt", "Bowling/v_Bowling_g08_c02.avi 2\n", 1, "unknown class 'Bowling'"),
    ("trainlist01.txt", "v_Archery_g08_c02.avi 2\n", 1, "expected '<class folder>/<video file>'"),
    ("trainlist01.txt", "../Archery/v_Archery_g08_c02.avi 2\n", 1, "is not a plain relative path"),
    ("trainlist01.txt", "YoYo/v_YoYo_g10_c03.avi 4\nArchery/v_Archery_g08_c02.avi 2\nYoYo/v_YoYo_g10_c03.avi 4\n", 3,
     "duplicate video 'YoYo/v_YoYo_g10_c03.avi' (first on line 1)"),
    ("testlist01.txt", "Archery/v_Archery_g01_c01.avi 2\n", 1, "expected '<class>/<video>.avi', got 2 fields"),
    ("testlist01.txt", "Archery/v_Archery_g01_c01.avi\nRowing/v_Rowing_g01_c01.avi\n", 2, "unknown class 'Rowing'"),
])
def test_ucf101_malformed_lines_name_file_and_line(ucf, name, text, line, message):
    path = write(os.path.join(ucf, name), text)
    with pytest.raises(SplitFormatError, match=re.escape(message)) as error:
        ucf101_rows(ucf, 1, "train" if name != "testlist01.txt" else "test")
    assert_names_line(error, path, line)


def test_ucf101_empty_file(ucf):
    path = write(os.path.join(ucf, "testlist01.txt"), "\r\n  \n")
    with pytest.raises(SplitFormatError, match="empty file"):
        ucf101_rows(ucf, 1, "test")
    assert os.path.exists(path)


# ----------------------------------------------------------------------------- HMDB-51

HMDB = {  # action -> {fold: lines}; names in the published style, marks 0 / 1 / 2
    "brush_hair": ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 ", "Brushing_my_hair_brush_hair_f_nm_np1_fr_med_0.avi 2 ",
                   "Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi 0 "],
    "clap": ["#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 2 ", "Alex_applauding_clap_u_cm_np1_fr_med_0.avi 1 ",
             "Applauding_Abby_clap_u_nm_np1_fr_med_0.avi 1 "],
    "climb_stairs": ["BIG_FISH_climb_stairs_f_nm_np1_fr_med_0.avi 1 ", "Dr_Stanley_climb_stairs_f_cm_np1_ba_med_0.avi 2 "],
}


def swap(line):
    """The same video with train and test swapped: what a different fold looks like."""
    name, mark = line.split()
    return f"{name} {dict(zip('012', '021'))[mark]} "


@pytest.fixture
def hmdb(tmp_path):
    folder = tmp_path / "testTrainMulti_7030_splits"
    for action, lines in HMDB.items():
        write(folder / f"{action}_test_split1.txt", "\n".join(lines) + "\n")
        write(folder / f"{action}_test_split2.txt", "\n".join(swap(x) for x in lines) + "\n")
    write(folder / "README.txt", "not a split file\n")
    return str(folder)


def test_hmdb51_rows_per_fold_and_split(hmdb):
    train = hmdb51_rows(hmdb, 1, "train")
    assert [(r["path"], r["label"]) for r in train] == [
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "brush_hair"),
        ("clap/Alex_applauding_clap_u_cm_np1_fr_med_0.avi", "clap"),
        ("clap/Applauding_Abby_clap_u_nm_np1_fr_med_0.avi", "clap"),
        ("climb_stairs/BIG_FISH_climb_stairs_f_nm_np1_fr_med_0.avi", "climb_stairs")]
    test = hmdb51_rows(hmdb, 1, "test")
    assert [r["path"] for r in test] == [
        "brush_hair/Brushing_my_hair_brush_hair_f_nm_np1_fr_med_0.avi", "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi",
        "climb_stairs/Dr_Stanley_climb_stairs_f_cm_np1_ba_med_0.avi"]
    unused = "Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi"
    assert not any(unused in str(r["path"]) for r in train + test)
    assert hmdb51_rows(hmdb, 2, "train") == test and hmdb51_rows(hmdb, 2, "test") == train
    with pytest.raises(SplitFormatError, match="no '<action>_test_split3.txt' files"):
        hmdb51_rows(hmdb, 3, "train")


def test_hmdb51_an_action_without_the_fold_is_an_error(hmdb):
    os.remove(os.path.join(hmdb, "clap_test_split2.txt"))
    assert len(hmdb51_rows(hmdb, 1, "train")) == 4
    with pytest.raises(SplitFormatError, match="no clap_test_split2.txt, though other folds have action 'clap'"):
        hmdb51_rows(hmdb, 2, "train")


@pytest.mark.parametrize("text, line, message", [
    ("a_clap_u_nm_np1_fr_goo_0.avi 1\nb_clap_u_nm_np1_fr_goo_0.avi\n", 2, "expected '<video>.avi <0|1|2>', got 1 field"),
    ("a_clap_u_nm_np1_fr_goo_0.avi 1 2\n", 1, "expected '<video>.avi <0|1|2>', got 3 field"),
    ("a_clap_u_nm_np1_fr_goo_0.avi 3\n", 1, "split mark '3' is not 0 (unused), 1 (train) or 2 (test)"),
    ("a_clap_u_nm_np1_fr_goo_0.avi train\n", 1, "split mark 'train' is not 0"),
    ("x/a_clap_u_nm_np1_fr_goo_0.avi 1\n", 1, "expected a file name, got the path"),
    ("a.avi 1\nb.avi 2\na.avi 2\n", 3, "duplicate video 'a.avi' (first on line 1)"),
])
def test_hmdb51_malformed_lines_name_file_and_line(hmdb, text, line, message):
    path = write(os.path.join(hmdb, "clap_test_split1.txt"), text)
    with pytest.raises(SplitFormatError, match=re.escape(message)) as error:
        hmdb51_rows(hmdb, 1, "test")
    assert_names_line(error, path, line)


def test_hmdb51_empty_file_and_missing_folder(hmdb, tmp_path):
    write(os.path.join(hmdb, "clap_test_split1.txt"), "")
    with pytest.raises(SplitFormatError, match="clap_test_split1.txt: empty file"):
        hmdb51_rows(hmdb, 1, "train")
    with pytest.raises(SplitFormatError, match="no such folder"):
        hmdb51_rows(str(tmp_path / "nowhere"), 1, "train")


# ----------------------------------------------------------------------------- Kinetics

KINETICS_TRAIN = ("label,youtube_id,time_start,time_end,split,is_cc\n"
                  "abseiling,---QUuC4vJs,3,13,train,0\n"
                  "air drumming,--nQbRBEz2s,104,114,train,0\n"
                  '"passing American football (in game)",-0Q8wbYZd0U,0,10,train,1\n'
                  "abseiling,-3B32lodo2M,59,69,train,0\n")
KINETICS_TEST = ("youtube_id,time_start,time_end,split\n"
                 "--33Lscn6sk,4,14,test\n"
                 "--DtF-LMR3I,12,22,test\n")


def test_kinetics_rows_with_and_without_labels(tmp_path):
    train = kinetics_rows(write(tmp_path / "train.csv", KINETICS_TRAIN))
    assert [r["path"] for r in train] == [
        "abseiling/---QUuC4vJs_000003_000013.mp4", "air drumming/--nQbRBEz2s_000104_000114.mp4",
        "passing American football (in game)/-0Q8wbYZd0U_000000_000010.mp4", "abseiling/-3B32lodo2M_000059_000069.mp4"]
    assert [r["label"] for r in train] == ["abseiling", "air drumming", "passing American football (in game)", "abseiling"]
    assert (train[1]["youtube_id"], train[1]["time_start"], train[1]["time_end"]) == ("--nQbRBEz2s", 104, 114)
    test = kinetics_rows(write(tmp_path / "test.csv", KINETICS_TEST))
    assert [r["path"] for r in test] == ["test/--33Lscn6sk_000004_000014.mp4", "test/--DtF-LMR3I_000012_000022.mp4"]
    assert all("label" not in r for r in test)


def test_kinetics_pattern_and_split_filter(tmp_path):
    mixed = KINETICS_TRAIN + "abseiling,-5YfCQBx7Ko,0,10,val,0\n"
    path = write(tmp_path / "all.csv", mixed)
    flat = kinetics_rows(path, pattern="{split}/{label_underscored}/{youtube_id}.mkv", split="val")
    assert [r["path"] for r in flat] == ["val/abseiling/-5YfCQBx7Ko.mkv"]
    assert len(kinetics_rows(path, split="train")) == 4
    with pytest.raises(ValueError, match=r"no rows with split 'test' \(it has: train \(4\), val \(1\)\)"):
        kinetics_rows(path, split="test")
    with pytest.raises(ValueError, match=r"unknown field '\{start\}'"):
        kinetics_rows(path, pattern="{youtube_id}_{start}.mp4")
    with pytest.raises(ValueError, match="pattern '{youtube_id:d}.mp4'"):
        kinetics_rows(path, pattern="{youtube_id:d}.mp4")
    with pytest.raises(ValueError, match=r"uses \{label\} but .*test.csv has no label column"):
        kinetics_rows(write(tmp_path / "test.csv", KINETICS_TEST), pattern="{label}/{youtube_id}.mp4")


HEADER = "label,youtube_id,time_start,time_end,split\n"


@pytest.mark.parametrize("text, line, message", [
    (HEADER + "abseiling,---QUuC4vJs,3,13\n", 2, "expected 5 fields (label,youtube_id,time_start,time_end,split), got 4"),
    (HEADER + "abseiling,---QUuC4vJs,3,13,train\nabseiling,x y,3,13,train\n", 3, "youtube_id 'x y' is not a YouTube id"),
    (HEADER + "abseiling,---QUuC4vJs,3.5,13,train\n", 2, "time_start '3.5' is not an integer"),
    (HEADER + "abseiling,---QUuC4vJs,13,13,train\n", 2, "bad times: start 13 s, end 13 s"),
    (HEADER + "abseiling,---QUuC4vJs,-1,9,train\n", 2, "bad times"),
    (HEADER + "abseiling,---QUuC4vJs,3,13,\n", 2, "empty split"),
    (HEADER + "abseiling,---QUuC4vJs,3,13,train\n,-3B32lodo2M,59,69,train\n", 3,
     "no label, unlike line 2: either every row has a label or none has"),
    (HEADER + "\nabseiling,---QUuC4vJs,3,13,train\nabseiling,---QUuC4vJs,3,13,train\n", 4,
     "duplicate clip 'abseiling/---QUuC4vJs_000003_000013.mp4' (first on line 3)"),
    ("label,youtube_id,time_start,time_end\nabseiling,---QUuC4vJs,3,13\n", 1, "no column 'split'"),
    ("label,youtube_id,start,time_start,time_end,split\n", 1, "unknown column 'start'"),
    ("label,label,youtube_id,time_start,time_end,split\n", 1, "column 'label' appears twice"),
    (HEADER + 'abseiling,"---QUuC4vJs,3,13,train\nabseiling,-3B32lodo2M,59,69,train\n', 2, "not valid CSV"),
])
def test_kinetics_malformed_lines_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path / "k.csv", text)
    with pytest.raises(SplitFormatError, match=re.escape(message)) as error:
        kinetics_rows(path)
    assert_names_line(error, path, line)


def test_kinetics_empty_files(tmp_path):
    with pytest.raises(SplitFormatError, match="empty file"):
        kinetics_rows(write(tmp_path / "a.csv", "\n\n"))
    with pytest.raises(SplitFormatError, match="a header but no rows"):
        kinetics_rows(write(tmp_path / "b.csv", HEADER))


# ----------------------------------------------------------------------------- AudioSet

AUDIOSET_EVAL = ("# Segments csv created Sun Mar  5 10:54:25 2017\n"
                 "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=5\n"
                 "# YTID, start_seconds, end_seconds, positive_labels\n"
                 '--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/07q6cd_,/m/0bt9lr"\n'
                 '--BfvyPmVMo, 20.000, 30.000, "/m/03l9g"\n'
                 '-0BIyqJj9ZU, 30.000, 40.000, "/m/07rgt08,/m/068hy"\n')
AUDIOSET_CLASSES = ("index,mid,display_name\n"
                    '0,/m/068hy,"Domestic animals, pets"\n'
                    "1,/m/07q6cd_,Squeak\n"
                    "2,/m/0bt9lr,Dog\n"
                    "3,/m/03l9g,Hammer\n"
                    '4,/m/07rgt08,"Chuckle, chortle"\n')


def test_audioset_rows_are_multi_label(tmp_path):
    path = write(tmp_path / "eval_segments.csv", AUDIOSET_EVAL)
    rows = audioset_rows(path)
    assert [r["path"] for r in rows] == ["--4gqARaEJE_0_10000.mp4", "--BfvyPmVMo_20000_30000.mp4",
                                         "-0BIyqJj9ZU_30000_40000.mp4"]
    assert [r["labels"] for r in rows] == ["/m/068hy;/m/07q6cd_;/m/0bt9lr", "/m/03l9g", "/m/07rgt08;/m/068hy"]
    assert all("label" not in r for r in rows)
    assert (rows[1]["youtube_id"], rows[1]["time_start"], rows[1]["time_end"]) == ("--BfvyPmVMo", 20.0, 30.0)
    names = read_audioset_classes(write(tmp_path / "class_labels_indices.csv", AUDIOSET_CLASSES))
    assert names["/m/07rgt08"] == "Chuckle, chortle"
    named = audioset_rows(path, class_names=names)
    assert [r["labels"] for r in named] == ["Domestic animals, pets;Squeak;Dog", "Hammer", "Chuckle, chortle;Domestic animals, pets"]
    custom = audioset_rows(path, pattern="{split}/{youtube_id}_{time_start:.1f}.mkv")
    assert custom[0]["path"] == "eval/--4gqARaEJE_0.0.mkv"


@pytest.mark.parametrize("body, line, message", [
    ('--4gqARaEJE, 0.000, 10.000, /m/068hy,/m/07q6cd_\n', 4, "expected 4 fields (YTID, start_seconds, end_seconds"),
    ('--4gqARaEJE, 0.000, 10.000\n', 4, "expected 4 fields"),
    ('--4gqARaEJE, zero, 10.000, "/m/068hy"\n', 4, "start_seconds 'zero' is not a number of seconds"),
    ('--4gqARaEJE, 0.000, nan, "/m/068hy"\n', 4, "end_seconds 'nan' is not a finite number"),
    ('--4gqARaEJE, 10.000, 0.000, "/m/068hy"\n', 4, "bad times: start 10 s, end 0 s"),
    ('--4gqARaEJE, 0.000, 10.000, "/m/068hy"\n--4gqARaEJE, 0.000, 10.000, "/m/03l9g"\n', 5,
     "duplicate clip '--4gqARaEJE_0_10000.mp4' (first on line 4)"),
    ('--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/068hy"\n', 4, "duplicate label '/m/068hy' in one segment"),
    ('--4gqARaEJE, 0.000, 10.000, "Dog"\n', 4, "label 'Dog' is not a MID"),
    ('--4gqARaEJE, 0.000, 10.000, ""\n', 4, "label '' is not a MID"),
    ('--4gqARaEJE, 0.000, 10.000, "/m/0zzzz"\n', 4, "unknown class '/m/0zzzz'"),
    ('--4gqAR/EJE, 0.000, 10.000, "/m/068hy"\n', 4, "YTID '--4gqAR/EJE' is not a YouTube id"),
    ('--4gqARaEJE, 0.000, 10.000, "/m/068hy\n', 4, "not valid CSV"),
])
def test_audioset_malformed_lines_name_file_and_line(tmp_path, body, line, message):
    path = write(tmp_path / "balanced_train_segments.csv", AUDIOSET_EVAL.split("--4gqARaEJE")[0] + body)
    names = read_audioset_classes(write(tmp_path / "class_labels_indices.csv", AUDIOSET_CLASSES))
    with pytest.raises(SplitFormatError, match=re.escape(message)) as error:
        audioset_rows(path, class_names=names)
    assert_names_line(error, path, line)


@pytest.mark.parametrize("text, line, message", [
    ("index,mid,name\n0,/m/068hy,Dog\n", 1, "expected the header 'index,mid,display_name'"),
    ("index,mid,display_name\n0,/m/068hy\n", 2, "expected 3 fields (index,mid,display_name), got 2"),
    ("index,mid,display_name\nzero,/m/068hy,Dog\n", 2, "class index 'zero' is not an integer"),
    ("index,mid,display_name\n0,/m/068hy,Dog\n2,/m/03l9g,Hammer\n", 3, "class index 2 out of order (expected 1"),
    ("index,mid,display_name\n0,/m/068hy,Dog\n1,/m/068hy,Hammer\n", 3, "duplicate MID '/m/068hy' (first on line 2)"),
    ("index,mid,display_name\n0,/m/068hy,Dog\n1,/m/03l9g,Dog\n", 3, "duplicate display name 'Dog' (first on line 2)"),
    ("index,mid,display_name\n0,/m/068hy,Dog;Cat\n", 2, "display name 'Dog;Cat' is empty or contains ';'"),
    ("index,mid,display_name\n0,m068hy,Dog\n", 2, "'m068hy' is not a MID"),
])
def test_audioset_class_list_errors(tmp_path, text, line, message):
    path = write(tmp_path / "class_labels_indices.csv", text)
    with pytest.raises(SplitFormatError, match=re.escape(message)) as error:
        read_audioset_classes(path)
    assert_names_line(error, path, line)


def test_audioset_only_comments_is_an_error(tmp_path):
    with pytest.raises(SplitFormatError, match="no segments"):
        audioset_rows(write(tmp_path / "eval_segments.csv", AUDIOSET_EVAL.split("--4gqARaEJE")[0]))


# ----------------------------------------------------------------------------- existence check and CLI


def test_drop_missing_keeps_order(tmp_path):
    rows = [{"path": "a/1.mp4"}, {"path": "b/2.mp4"}, {"path": "a/3.mp4"}]
    write(tmp_path / "a" / "1.mp4", "x")
    write(tmp_path / "a" / "3.mp4", "x")
    kept, missing = drop_missing(rows, str(tmp_path))
    assert [r["path"] for r in kept] == ["a/1.mp4", "a/3.mp4"] and missing == ["b/2.mp4"]


def test_cli_ucf101_writes_a_manifest_and_respects_force(ucf, tmp_path, capsys):
    out = str(tmp_path / "out" / "ucf_train1.csv")
    assert main(["manifest", "ucf101", ucf, out, "--fold", "1", "--split", "train"]) == 0
    assert capsys.readouterr().out.strip() == f"UCF-101 fold 1 train: 5 rows, 4 classes; wrote {out}"
    manifest = read_manifest(out, root=str(tmp_path / "videos"))
    assert manifest.columns == ["path", "label"] and len(manifest) == 5
    assert manifest.classes == ["ApplyEyeMakeup", "Archery", "HandstandPushups", "YoYo"]
    assert manifest.path(2) == str(tmp_path / "videos" / "Archery" / "v_Archery_g08_c02.avi")

    assert main(["manifest", "ucf101", ucf, out, "--split", "test"]) == 2
    assert f"{out}: exists; pass --force" in capsys.readouterr().err
    assert len(read_manifest(out)) == 5
    assert main(["manifest", "ucf101", ucf, out, "--split", "test", "--force"]) == 0
    assert len(read_manifest(out)) == 3


def test_cli_hmdb51_and_malformed_input(hmdb, tmp_path, capsys):
    out = str(tmp_path / "hmdb_test2.csv")
    assert main(["manifest", "hmdb51", hmdb, out, "--fold", "2", "--split", "test"]) == 0
    assert "HMDB-51 fold 2 test: 4 rows, 3 classes" in capsys.readouterr().out
    assert read_manifest(out).label_indices() == [0, 1, 1, 2]
    bad = write(os.path.join(hmdb, "clap_test_split1.txt"), "a.avi 1\nb.avi 7\n")
    assert main(["manifest", "hmdb51", hmdb, str(tmp_path / "other.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"avidfast: error: {bad}:2: split mark '7'") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "other.csv")


def test_cli_kinetics_checks_files(tmp_path, capsys):
    csv_path = write(tmp_path / "train.csv", KINETICS_TRAIN)
    videos = tmp_path / "videos"
    write(videos / "abseiling" / "---QUuC4vJs_000003_000013.mp4", "x")
    write(videos / "air drumming" / "--nQbRBEz2s_000104_000114.mp4", "x")
    out = str(tmp_path / "k.csv")
    assert main(["manifest", "kinetics", csv_path, out, "--check-dir", str(videos)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == (f"Kinetics train.csv: 2 rows, 2 classes, 2 of 4 missing under {videos} and left out "
                               f"(first: passing American football (in game)/-0Q8wbYZd0U_000000_000010.mp4); wrote {out}")
    manifest = read_manifest(out, root=str(videos))
    assert manifest.columns == ["path", "label", "youtube_id", "time_start", "time_end"]
    assert all(os.path.isfile(manifest.path(i)) for i in range(len(manifest)))
    assert main(["manifest", "kinetics", csv_path, str(tmp_path / "none.csv"), "--check-dir", str(tmp_path / "empty")]) == 2
    assert "--check-dir" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["manifest", "kinetics", csv_path, str(tmp_path / "none.csv"), "--check-dir", str(tmp_path / "empty")]) == 2
    assert "none of the 4 videos is under" in capsys.readouterr().err
    assert main(["manifest", "kinetics", csv_path, csv_path, "--force"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert main(["manifest", "kinetics", csv_path, str(tmp_path / "p.csv"), "--pattern", "{nope}.mp4"]) == 2
    assert "unknown field '{nope}'" in capsys.readouterr().err

    test_csv = write(tmp_path / "test.csv", KINETICS_TEST)
    assert main(["manifest", "kinetics", test_csv, str(tmp_path / "t.csv")]) == 0
    assert "2 rows, 0 classes" in capsys.readouterr().out
    unlabelled = read_manifest(str(tmp_path / "t.csv"))
    assert not unlabelled.has_labels and "label" not in unlabelled.columns


def test_cli_audioset_writes_labels_column(tmp_path, capsys):
    csv_path = write(tmp_path / "eval_segments.csv", AUDIOSET_EVAL)
    classes = write(tmp_path / "class_labels_indices.csv", AUDIOSET_CLASSES)
    out = str(tmp_path / "as.csv")
    assert main(["manifest", "audioset", csv_path, out, "--class-labels", classes]) == 0
    assert capsys.readouterr().out.strip() == f"AudioSet eval_segments.csv: 3 rows, 5 classes; wrote {out}"
    manifest = read_manifest(out)
    assert manifest.columns == ["path", "labels", "youtube_id", "time_start", "time_end"]
    assert manifest.rows[0]["labels"].split(";") == ["Domestic animals, pets", "Squeak", "Dog"]
    assert not manifest.has_labels  # the single-label column stays absent
    assert main(["manifest", "audioset", csv_path, out, "--force", "--class-labels", csv_path]) == 2
    assert f"{csv_path}:1: expected the header 'index,mid,display_name'" in capsys.readouterr().err


def test_cli_audioset_subset_from_a_list_keeps_the_lists_order(tmp_path, capsys):
    csv_path = write(tmp_path / "unbalanced_train_segments.csv", AUDIOSET_EVAL)
    # the AVID-CMA code's list format (clip file names), a bare id, a comment, an id the CSV lacks
    listed = write(tmp_path / "train-100k.txt", "-0BIyqJj9ZU_30000_40000.mp4\n# a comment\n\n--4gqARaEJE\n"
                                               "zzzzzzzzzzz_0_10000.mp4\n")
    out = str(tmp_path / "subset.csv")
    assert main(["manifest", "audioset", csv_path, out, "--subset", listed]) == 0
    assert capsys.readouterr().out.strip() == (
        f"AudioSet unbalanced_train_segments.csv, the 3 ids of {listed} in its order (1 not in the CSV and left out, "
        f"first: zzzzzzzzzzz): 2 rows, 4 classes; wrote {out}")
    assert [r["youtube_id"] for r in read_manifest(out).rows] == ["-0BIyqJj9ZU", "--4gqARaEJE"]
    bad = write(tmp_path / "bad.txt", "--4gqARaEJE\nnot-an-id\n")
    assert main(["manifest", "audioset", csv_path, str(tmp_path / "b.csv"), "--subset", bad]) == 2
    assert f"{bad}:2: 'not-an-id' is neither a YouTube id" in capsys.readouterr().err
    twice = write(tmp_path / "twice.txt", "--4gqARaEJE\n--4gqARaEJE_0_10000.mp4\n")
    assert main(["manifest", "audioset", csv_path, str(tmp_path / "t.csv"), "--subset", twice]) == 2
    assert "duplicate YouTube id '--4gqARaEJE' (first on line 1)" in capsys.readouterr().err
    none = write(tmp_path / "none.txt", "zzzzzzzzzzz\n")
    assert main(["manifest", "audioset", csv_path, str(tmp_path / "n.csv"), "--subset", none]) == 2
    assert "none of its 1 YouTube ids is in" in capsys.readouterr().err


def test_cli_audioset_random_subset_is_seeded(tmp_path, capsys):
    csv_path = write(tmp_path / "unbalanced_train_segments.csv", AUDIOSET_EVAL)
    drawn = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        out = str(tmp_path / f"{name}.csv")
        assert main(["manifest", "audioset", csv_path, out, "--subset-size", "2", "--seed", str(seed)]) == 0
        assert f"a random subset of 2 (seed {seed}): 2 rows" in capsys.readouterr().out
        drawn[name] = [r["youtube_id"] for r in read_manifest(out).rows]
    order = ["--4gqARaEJE", "--BfvyPmVMo", "-0BIyqJj9ZU"]
    assert drawn["a"] == drawn["b"] and all(sorted(d, key=order.index) == d for d in drawn.values())
    seeds = {tuple(rows[0]["youtube_id"] for rows in [random_rows(audioset_rows(csv_path), 1, seed)]) for seed in range(20)}
    assert len(seeds) == 3, "the seed changes the draw"
    assert main(["manifest", "audioset", csv_path, str(tmp_path / "x.csv"), "--subset-size", "4"]) == 2
    assert "--subset-size 4: must lie in [1, 3]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["manifest", "audioset", csv_path, str(tmp_path / "y.csv"), "--subset-size", "2", "--subset", csv_path])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["manifest"], ["manifest", "ucf101"], ["manifest", "hmdb51"],
                                  ["manifest", "kinetics"], ["manifest", "audioset"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: avidfast {' '.join(argv)}") and "--help" in text
    if len(argv) == 2:
        assert "--check-dir" in text and "--force" in text


def test_cli_manifest_feeds_prepare(ucf, tmp_path, capsys):
    from media import make_clip

    videos = tmp_path / "UCF-101"
    for seed, line in enumerate(UCF_TEST1.split()):
        make_clip(str(videos / line), seconds=1.5, codec="mpeg4", seed=seed)
    listed = str(tmp_path / "ucf_test1.csv")
    assert main(["manifest", "ucf101", ucf, listed, "--split", "test", "--check-dir", str(videos)]) == 0
    assert "3 rows, 3 classes, all found under" in capsys.readouterr().out
    out = tmp_path / "prepared"
    assert main(["prepare", listed, str(out), "--root", str(videos), "--workers", "0", "--quiet",
                 "--min-seconds", "1"]) == 0
    prepared = read_manifest(str(out / "manifest.csv"))
    assert [r["label"] for r in prepared.rows] == ["ApplyEyeMakeup", "Archery", "YoYo"]
    assert all(r["duration"] > 1 and os.path.isfile(prepared.path(i)) for i, r in enumerate(prepared.rows))
