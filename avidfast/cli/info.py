"""`avidfast info`: the installation and machine, for bug reports."""
import argparse
import json


def _info(args: argparse.Namespace) -> None:
    from avidfast.environment import describe, format_report

    facts = describe()
    print(json.dumps(facts, indent=2) if args.json else format_report(facts))


def register(commands) -> None:
    """Adds `info` to the top-level subparsers."""
    parser = commands.add_parser(
        "info", help="versions, compiled kernels and machine facts (paste into bug reports)",
        description="Prints avidfast's version, the torch it runs and the one its extension was "
                    "built against, the CUDA archs compiled in, the CPU kernel variant chosen at "
                    "load time, OpenMP and thread counts, huge pages, and the PyAV, torchcodec "
                    "and DALI versions (and whether DALI sees a GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.set_defaults(handler=_info)
