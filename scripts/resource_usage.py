#!/usr/bin/env python3
"""The resource table of avidfast's CUDA kernels, read from a built library with cuobjdump.

    python scripts/resource_usage.py LIBRARY.so [--table csrc/ops/cuda/resource_usage.json] [--check]

Runs ``cuobjdump --dump-resource-usage`` on the library (the machine code of every arch it
holds), demangles the kernel names (c++filt), and writes one JSON table: for each kernel and
arch, its registers per thread, static shared memory bytes (its ``__shared__`` variables), stack
and local (spill) bytes. ``make cuda-check`` runs it with --check after the CUDA build: the
table is regenerated and compared with the committed one; when they differ, the new table is
written in its place and the exit status is 1 (commit the new table). tests/test_launch_plan.py
reads the committed table on the CPU to check every launch plan against the static shared sizes
the kernels really have.

cuobjdump is looked for in $CUOBJDUMP, $CUDA_HOME/bin, PATH, and the copy that triton (a
dependency of CUDA builds of torch) ships. Standard library only.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TABLE = REPO / "csrc" / "ops" / "cuda" / "resource_usage.json"
FIELDS = ("registers", "static_shared", "stack", "local")
# cuobjdump's names of the fields above.
CUOBJDUMP_FIELDS = {"REG": "registers", "SHARED": "static_shared", "STACK": "stack", "LOCAL": "local"}
# Qualifiers left out of the table's kernel names.
QUALIFIERS = ("(anonymous namespace)::", "avidfast::", "gpu::", "cma::", "c10::")


def find_cuobjdump() -> Optional[str]:
    """Path of a cuobjdump, or None."""
    explicit = os.environ.get("CUOBJDUMP")
    if explicit:
        return explicit
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "cuobjdump")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = os.path.join(root, "backends", "nvidia", "bin", "cuobjdump")
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def demangle(names: List[str]) -> List[str]:
    """c++filt over the mangled names (unchanged where c++filt is missing)."""
    if not names or shutil.which("c++filt") is None:
        return list(names)
    result = subprocess.run(["c++filt"], input="\n".join(names) + "\n", capture_output=True, text=True,
                            check=True)
    out = result.stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def short_name(demangled: str) -> str:
    """'void avidfast::gpu::(anonymous namespace)::rows_kernel<1, float, ...>(...)' ->
    'rows_kernel<1, float, ...>': no return type, namespaces or parameter list."""
    name = demangled
    for qualifier in QUALIFIERS:
        name = name.replace(qualifier, "")
    if name.startswith("void "):
        name = name[len("void "):]
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    return re.sub(r"\s*>", ">", name).strip()


def parse_resource_usage(text: str) -> Dict[str, Dict[str, Dict[str, int]]]:
    """cuobjdump --dump-resource-usage output -> {mangled name: {arch: {field: value}}}."""
    table: Dict[str, Dict[str, Dict[str, int]]] = {}
    arch = None
    in_elf = False
    function = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Fatbin elf code"):
            in_elf, arch = True, None
        elif stripped.startswith("Fatbin ptx code"):
            in_elf, arch = False, None
        elif stripped.startswith("arch = "):
            arch = stripped.split("=", 1)[1].strip()
        elif stripped.startswith("Function ") and stripped.endswith(":"):
            function = stripped[len("Function "):-1]
        elif function is not None and stripped.startswith("REG:"):
            if in_elf and arch:
                values = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", stripped))
                entry = {CUOBJDUMP_FIELDS[k]: int(v) for k, v in values.items() if k in CUOBJDUMP_FIELDS}
                table.setdefault(function, {})[arch] = entry
            function = None
    return table


def build_table(library: Path, cuobjdump: str) -> dict:
    """The resource table of ``library``: {archs, fields, kernels: {short name: {arch: [values]}}}."""
    result = subprocess.run([cuobjdump, "--dump-resource-usage", str(library)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"resource_usage: {cuobjdump} failed on {library}: {result.stderr.strip()[-500:]}")
    parsed = parse_resource_usage(result.stdout)
    if not parsed:
        raise SystemExit(f"resource_usage: no kernel found in {library} (is it a CUDA build?)")
    mangled = sorted(parsed)
    kernels: Dict[str, Dict[str, List[int]]] = {}
    archs = set()
    for raw, demangled in zip(mangled, demangle(mangled)):
        name = short_name(demangled)
        for arch, entry in parsed[raw].items():
            archs.add(arch)
            row = kernels.setdefault(name, {})
            values = [entry.get(field, 0) for field in FIELDS]
            # Two kernels with one short name (not expected): keep the larger of each field.
            row[arch] = [max(a, b) for a, b in zip(row[arch], values)] if arch in row else values
    return {"archs": sorted(archs, key=lambda a: int(re.sub(r"\D", "", a) or 0)), "fields": list(FIELDS),
            "kernels": {name: dict(sorted(kernels[name].items())) for name in sorted(kernels)}}


def render(table: dict) -> str:
    """The table as JSON with one kernel per line (diffs stay readable)."""
    lines = ["{",
             '  "generated_by": "make cuda-check (scripts/resource_usage.py: cuobjdump --dump-resource-usage)",',
             f'  "archs": {json.dumps(table["archs"])},',
             f'  "fields": {json.dumps(table["fields"])},',
             '  "kernels": {']
    names = list(table["kernels"])
    for i, name in enumerate(names):
        comma = "," if i + 1 < len(names) else ""
        lines.append(f"    {json.dumps(name)}: {json.dumps(table['kernels'][name], separators=(', ', ': '))}{comma}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def differences(old: Optional[dict], new: dict, limit: int = 20) -> List[str]:
    """Human-readable differences between two tables."""
    if old is None:
        return ["no committed table"]
    out = []
    if old.get("archs") != new["archs"]:
        out.append(f"archs: {old.get('archs')} -> {new['archs']}")
    old_kernels, new_kernels = old.get("kernels", {}), new["kernels"]
    for name in sorted(set(old_kernels) | set(new_kernels)):
        if old_kernels.get(name) != new_kernels.get(name):
            out.append(f"{name}: {old_kernels.get(name)} -> {new_kernels.get(name)}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def summary(table: dict) -> str:
    """The table as aligned text, one column per field with its values per arch ('a/b'), for the log."""
    archs = table["archs"]
    rows = []
    for name, per_arch in table["kernels"].items():
        cells = ["/".join(str(per_arch[a][i]) if a in per_arch else "-" for a in archs)
                 for i in range(len(FIELDS))]
        rows.append((name, *cells))
    head = ("kernel", *(f"{field} ({'/'.join(archs)})" for field in FIELDS))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = [head[0].ljust(widths[0]) + "".join(f" {h:>{w}}" for h, w in zip(head[1:], widths[1:]))]
    lines += [r[0].ljust(widths[0]) + "".join(f" {c:>{w}}" for c, w in zip(r[1:], widths[1:])) for r in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", type=Path, help="the built avidfast/_C*.so")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="the committed table (JSON)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed table; when stale, rewrite it and exit 1")
    parser.add_argument("--quiet", action="store_true", help="no per-kernel summary")
    args = parser.parse_args(argv)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("resource_usage: cuobjdump not found (set CUOBJDUMP or CUDA_HOME)", file=sys.stderr)
        return 2
    table = build_table(args.library, cuobjdump)
    if not args.quiet:
        print(summary(table))
    old = load(args.table)
    stale = differences(old, table) if old is None or old.get("archs") != table["archs"] \
        or old.get("kernels") != table["kernels"] else []
    if stale or not args.check:
        args.table.write_text(render(table))
    if args.check and stale:
        print(f"resource_usage: the committed table {args.table} was stale; the new one is written in "
              "its place (commit it):", file=sys.stderr)
        for line in stale:
            print("  " + line, file=sys.stderr)
        return 1
    print(f"resource_usage: {len(table['kernels'])} kernels x {', '.join(table['archs'])} "
          f"({cuobjdump}); {args.table} is {'up to date' if args.check else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
