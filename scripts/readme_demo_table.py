"""Regenerates README.md's demo status sentence and demo table from a demo's results.json.

Usage: python scripts/readme_demo_table.py [RESULTS] [--check]

RESULTS (default runs/demo/results.json, what `make demo` writes) is copied to
docs/demo_results.json, the figures the README quotes, and the README's ``<!-- demo-status -->``
and ``<!-- demo-table -->`` blocks are rendered from it (avidfast.demo.report). With ``--check``
nothing is written: the exit status is 1 when the README differs from what docs/demo_results.json
renders (tests/test_demo.py checks the same).
"""
import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
QUOTED = os.path.join(ROOT, "docs", "demo_results.json")


def main(argv=None) -> int:
    from avidfast.demo.report import readme_with_demo
    from avidfast.files import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=os.path.join("runs", "demo", "results.json"),
                        help="a demo's results.json (default: runs/demo/results.json)")
    parser.add_argument("--check", action="store_true",
                        help="only compare README.md with what docs/demo_results.json renders")
    args = parser.parse_args(argv)
    source = QUOTED if args.check else args.results
    try:
        with open(source) as f:
            figures = json.load(f)
    except (OSError, ValueError) as e:
        print(f"readme_demo_table: cannot read {source} ({e}); run `make demo` first", file=sys.stderr)
        return 2
    with open(README) as f:
        readme = f.read()
    rendered = readme_with_demo(readme, figures)
    if args.check:
        if rendered != readme:
            print("README.md's demo blocks differ from docs/demo_results.json; run scripts/readme_demo_table.py",
                  file=sys.stderr)
            return 1
        return 0
    if os.path.abspath(source) != QUOTED:
        shutil.copyfile(source, QUOTED + ".tmp")
        os.replace(QUOTED + ".tmp", QUOTED)
    atomic_write_text(README, rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
