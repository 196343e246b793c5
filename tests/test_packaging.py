"""The built distributions hold what users need: the wheel every runtime file of the package,
the sdist everything needed to build it.

`make test` builds both into dist/ first and passes them in AVIDFAST_DIST; run alone, the test
builds them itself (`python -m build --no-isolation`, a few minutes: it compiles the extension).
"""
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_PARTS = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".so", ".o")


def _source_files(folder: str):
    """Files of the source tree under `folder` (relative to the repository root) that git knows."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", folder],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("the source tree is not a git checkout")
    return {
        name for name in listed.stdout.splitlines()
        if (ROOT / name).is_file() and not any(p in SKIPPED_PARTS for p in Path(name).parts)
        and not name.endswith(SKIPPED_SUFFIXES)
    }


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no source tree beside the tests (installed tests): nothing to compare with")
    given = os.environ.get("AVIDFAST_DIST")
    if given:
        folder = Path(given)
    else:
        folder = tmp_path_factory.mktemp("dist")
        subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", str(folder),
                        str(ROOT)], check=True, capture_output=True, timeout=1800)
    wheels, sdists = sorted(folder.glob("avidfast-*.whl")), sorted(folder.glob("avidfast-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in {folder}"
    return wheels[0], sdists[0]


def test_wheel_holds_every_package_file(dist):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    package = {name for name in names if name.startswith("avidfast/")}
    expected = _source_files("avidfast")
    missing = sorted(expected - package)
    assert not missing, f"{wheel.name} lacks package files of the source tree: {missing}"
    extensions = [name for name in package if name.startswith("avidfast/_C") and name.endswith(".so")]
    assert len(extensions) == 1, f"{wheel.name} should hold one compiled avidfast/_C*.so, has {extensions}"
    unexpected = sorted(package - expected - set(extensions))
    assert not unexpected, f"{wheel.name} holds files that are not in the source tree: {unexpected}"
    assert any(name.endswith(".dist-info/entry_points.txt") for name in names)
    assert any(name.startswith("avidfast/configs/eval/") for name in package)


def test_sdist_holds_everything_needed_to_build(dist):
    _, sdist = dist
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = {name[len(top) + 1:] for name in archive.getnames() if name.startswith(top + "/")}
    required = {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", "MANIFEST.in"}
    required |= _source_files("csrc") | _source_files("avidfast") | _source_files("docs")
    missing = sorted(required - names)
    assert not missing, f"{sdist.name} lacks files needed to build or read avidfast: {missing}"
