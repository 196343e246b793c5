"""The package is a house of floors: a module imports only from its own floor or below.

Floors, lowest first (a subpackage or top-level module of avidfast per entry):
  0  errors, files, hugepages      no avidfast imports beyond floor 0
  1  ops, distributed, data        the operators, collectives, media and manifests
  2  models, losses                networks; memory banks and losses on the operators
  3  config                        the typed-YAML engine; its choices come from floors 1-2
  4  checkpoints                   save/load, the reference format, building model and loss
  5  train                         the training loop
  6  eval                          the evaluation protocols
  7  demo, bench, environment      applications and reports
  8  cli                           parsing only
The package root (avidfast/__init__.py) is floor 0. Checked by reading every module's imports
(function-level imports included), so a lazy import cannot hide an upward dependency.
"""
import ast
from pathlib import Path

import pytest

FLOORS = {
    "errors": 0, "files": 0, "hugepages": 0, "": 0,
    "ops": 1, "distributed": 1, "data": 1,
    "models": 2, "losses": 2,
    "config": 3,
    "checkpoints": 4,
    "train": 5,
    "eval": 6,
    "demo": 7, "bench": 7, "environment": 7,
    "cli": 8,
}
PACKAGE = Path(__file__).resolve().parents[1] / "avidfast"


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, module: str):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "avidfast":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "avidfast":
                if node.module == "avidfast":  # from avidfast import x: x is a room, or a name of the root
                    for alias in node.names:
                        is_room = (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file()
                        yield node.lineno, f"avidfast.{alias.name}" if is_room else "avidfast"
                else:
                    yield node.lineno, node.module


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        yield path, module


def test_every_room_has_a_floor():
    rooms = {_room(module) for _, module in _modules()}
    unknown = sorted(rooms - set(FLOORS))
    assert not unknown, f"rooms without a floor in tests/test_layers.py: {unknown}"


def test_no_import_runs_upward():
    if not PACKAGE.is_dir():
        pytest.skip("no source tree beside the tests")
    upward = []
    for path, module in _modules():
        floor = FLOORS[_room(module)]
        for line, target in _imports(path, module):
            target_floor = FLOORS.get(_room(target))
            assert target_floor is not None, f"{path}:{line} imports {target}, a room with no floor"
            if target_floor > floor:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({module}, floor {floor}) imports "
                              f"{target} (floor {target_floor})")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)
