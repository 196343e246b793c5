"""Manifests read by column: the same rows as a dict per row would give, errors by line, memory per row."""
import tracemalloc

import pytest

from avidfast.data.manifest import ManifestError, ManifestRows, read_manifest, write_manifest


def test_rows_round_trip_and_compare_as_dicts(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label,duration,width,extra\na.mp4,cat,1.5,320,x\nb.mp4,,,,\n\nc.mp4,dog,2,64.0\n")
    manifest = read_manifest(str(path))
    expected = [
        {"path": "a.mp4", "label": "cat", "duration": 1.5, "width": 320, "extra": "x"},
        {"path": "b.mp4", "label": None, "duration": None, "width": None, "extra": None},
        {"path": "c.mp4", "label": "dog", "duration": 2.0, "width": 64, "extra": None},
    ]
    assert isinstance(manifest.rows, ManifestRows) and manifest.rows == expected and list(manifest.rows) == expected
    assert manifest.rows[-1] == expected[-1] and manifest.rows[1:] == expected[1:]
    assert manifest.column("width") == [320, None, 64] and manifest.classes == ["cat", "dog"]
    write_manifest(str(tmp_path / "again.csv"), manifest.rows, columns=manifest.columns)
    assert read_manifest(str(tmp_path / "again.csv")).rows == expected


@pytest.mark.parametrize("text, message", [
    ("path,duration\na.mp4,1\nb.mp4,zz\n", "line 3: column 'duration' has 'zz', which is not a number"),
    ("path,label\na.mp4,1,2\n", "line 2: more fields than the 2 columns"),
    ("path,label\n,1\n", "line 2: empty 'path'"),
    ("path\n", "has a header but no rows"),
    ("x,y\n1,2\n", "needs a header row with a 'path' column"),
])
def test_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(path))


def test_a_bad_number_deep_in_a_long_manifest_names_its_line(tmp_path):
    lines = ["path,duration"] + [f"v{i}.mp4,{i}.5" for i in range(40_000)]
    lines[30_001] = "v30000.mp4,ten"
    (tmp_path / "long.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match="line 30002: column 'duration' has 'ten'"):
        read_manifest(str(tmp_path / "long.csv"))


def test_rows_take_a_few_hundred_bytes_each(tmp_path):
    rows = 50_000
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write("path,label,duration,fps,width,height,sample_rate,channels,audio_duration,audio_path\n")
        for i in range(rows):
            f.write(f"videos/{i // 1000:04d}/{i:08d}_{i * 7919 % 1000003:07d}.mp4,/m/{i % 527:05x},10.0,25.0,340,256,"
                    f"48000,2,9.98,audio/{i // 1000:04d}/{i:08d}.wav\n")
    tracemalloc.start()
    manifest = read_manifest(str(path))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(manifest) == rows
    # the two paths alone are ~260 bytes a row as Python strings; a dict per row would add ~500 more
    assert held / rows < 400, held / rows
