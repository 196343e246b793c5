"""Docs that live in the repository: every Markdown file the code or the docs refer to exists.

Scans avidfast/, csrc/, README.md, BENCHMARKS.md and docs/ for names of Markdown files
(``method.md``, ``docs/method.md``, ``../BENCHMARKS.md``, links ``[text](architecture.md#anchor)``)
and fails naming every one that resolves to no file of the repository. A reference resolves when
it names a repository file relative to the referring file's folder or to the repository root.
Repository files: ``git ls-files --cached --others --exclude-standard`` (tracked, plus new files not
ignored), or a walk of the root when git is unavailable. Skips when the source tree is absent
(tests run against an installed wheel).
"""
import os
import re
import subprocess
from pathlib import Path
from typing import Iterable, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("avidfast", "csrc", "README.md", "BENCHMARKS.md", "docs")
TEXT_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".md", ".txt", ".yaml", ".yml", ".toml", ".cfg", ".sh"}
REQUIRED_DOCS = ("docs/method.md", "docs/architecture.md", "docs/benchmarking.md", "docs/migration.md")
# A Markdown file name, optionally with folders and a leading ./ or ../ chain: not preceded by a
# character that could continue a path or a URL (so https://host/x/README.md is not taken).
MD_REFERENCE = re.compile(r"(?<![\w./:-])((?:\.\.?/)*(?:[\w-][\w.-]*/)*[\w-][\w.-]*\.md)(?![\w-])")
WALK_SKIP = {".git", ".venv", "build", "dist", "__pycache__", "runs", "node_modules"}


def md_references(text: str) -> List[str]:
    """Names of Markdown files mentioned in ``text``, in order (URLs left out)."""
    return [m.group(1) for m in MD_REFERENCE.finditer(text)]


def _source_tree_present() -> bool:
    return all((ROOT / name).exists() for name in ("avidfast", "csrc", "README.md"))


def repository_files(root: Path) -> Set[str]:
    """Paths (relative, '/'-separated) of the repository's files that exist on disk."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root, capture_output=True, check=True, timeout=60,
        ).stdout.decode("utf-8", "replace").split("\0")
        return {p for p in listed if p and (root / p).is_file()}
    except (OSError, subprocess.SubprocessError):
        pass
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in WALK_SKIP and not d.startswith(".")]
        for name in files:
            found.add((Path(folder) / name).relative_to(root).as_posix())
    return found


def scanned_files(files: Set[str]) -> List[str]:
    """The text files under SCANNED among ``files``."""
    out = []
    for path in sorted(files):
        top = path.split("/", 1)[0]
        if (path in SCANNED or top in SCANNED) and Path(path).suffix in TEXT_SUFFIXES:
            out.append(path)
    return out


def resolve(reference: str, referrer: str, files: Set[str]) -> Optional[str]:
    """The repository file ``reference`` (found in file ``referrer``) names, or None."""
    for base in (Path(referrer).parent, Path(".")):
        candidate = os.path.normpath((base / reference).as_posix()).replace(os.sep, "/")
        if candidate in files:
            return candidate
    return None


def broken_references(root: Path) -> Tuple[List[str], int]:
    """('file:line: reference' for every unresolved reference, number of references checked)."""
    files = repository_files(root)
    broken, checked = [], 0
    for path in scanned_files(files):
        text = (root / path).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for reference in md_references(line):
                checked += 1
                if resolve(reference, path, files) is None:
                    broken.append(f"{path}:{number}: {reference}")
    return broken, checked


@pytest.fixture(scope="module")
def source_tree() -> Path:
    if not _source_tree_present():
        pytest.skip(f"the source tree is not here ({ROOT} has no avidfast/, csrc/ and README.md): "
                    "these tests check the repository's files, not an installed package")
    return ROOT


def test_reference_pattern():
    text = ("see docs/method.md, method.md#avid-loss and [b](../BENCHMARKS.md); "
            "not https://github.com/facebookresearch/AVID-CMA/blob/main/README.md nor *.md")
    assert md_references(text) == ["docs/method.md", "method.md", "../BENCHMARKS.md"]


def test_resolution_relative_to_referrer_then_root():
    files = {"README.md", "BENCHMARKS.md", "docs/method.md", "docs/architecture.md"}
    assert resolve("architecture.md", "docs/method.md", files) == "docs/architecture.md"
    assert resolve("../BENCHMARKS.md", "docs/benchmarking.md", files) == "BENCHMARKS.md"
    assert resolve("docs/method.md", "avidfast/ops/nce.py", files) == "docs/method.md"
    assert resolve("BENCHMARKS.md", "docs/README.md", files) == "BENCHMARKS.md"
    assert resolve("METHOD.md", "avidfast/ops/nce.py", files) is None


def test_every_markdown_reference_resolves(source_tree):
    broken, checked = broken_references(source_tree)
    assert checked > 0, "no Markdown reference found at all: the scan is looking in the wrong place"
    assert not broken, (
        "references to Markdown files that are not in the repository (write the doc under docs/ "
        "or cite the one that exists):\n  " + "\n  ".join(broken)
    )


def _readme_links(text: str) -> Iterable[str]:
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        yield target.split("#", 1)[0]


def test_readme_links_the_docs(source_tree):
    text = (source_tree / "README.md").read_text(encoding="utf-8")
    links = [t for t in _readme_links(text) if t.startswith("docs/")]
    missing = [t for t in links if not (source_tree / t).is_file()]
    assert not missing, f"README.md links to docs that do not exist: {missing}"
    unlinked = [doc for doc in REQUIRED_DOCS if doc not in links]
    assert not unlinked, f"README.md does not link {unlinked} (its Documentation section should)"
