"""The demo's goals and verdict, its printed table and the README's demo table, from results.json.

Every figure is a fraction measured on the held-out clips (a second synthetic set the network
never saw), given with its 95% Wilson interval. A goal holds when the trained network's figure
reaches its multiple of chance *and* the low end of its interval lies above the high end of the
random network's interval (the same network at initialisation), so that a lucky draw of held-out
clips cannot pass it.
"""
import os
from typing import Dict, List, Tuple

DIRECTIONS = (("v2a", "video->audio"), ("a2v", "audio->video"))
CLASS_TIMES = 3.0  # class-level cross-modal precision@1 >= 3x chance
RECALL_K = 5
RECALL_TIMES = 3.0  # instance recall@5 >= 3x chance
PROBE_TIMES = 4.0  # linear probe (video top-1) >= 4x chance


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _with_interval(value: float, interval) -> str:
    return f"{100 * value:5.1f}% [{100 * interval[0]:4.1f}, {100 * interval[1]:4.1f}]"


def _compact(value: float, interval) -> str:
    return f"{100 * value:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def rows(figures: Dict[str, object]) -> List[Tuple[str, float, Tuple[float, float], float, Tuple[float, float], float]]:
    """The table's rows: (what, trained, trained interval, random, random interval, chance)."""
    out = []
    it, ir = figures["instance_trained"], figures["instance_random"]
    for key, title in DIRECTIONS:
        for k in (1, RECALL_K):
            name = f"R@{k}"
            out.append((f"{title} recall@{k} (own sound / picture)", it[key][name], it["interval"][key][name],
                        ir[key][name], ir["interval"][key][name], it["chance"][name]))
    ct, cr = figures["class_trained"], figures["class_random"]
    for key, title in DIRECTIONS:
        out.append((f"{title} class precision@1", ct[key], ct["interval"][key], cr[key], cr["interval"][key],
                    ct["chance"]))
    lt, lr = figures["linear_trained"], figures["linear_random"]
    out.append((f"linear probe video top-1 ({lt['best_block']} / {lr['best_block']})", lt["held_out_top1"],
                lt["interval"], lr["held_out_top1"], lr["interval"], lt["chance"]))
    return out


def goals(figures: Dict[str, object]) -> List[Dict[str, object]]:
    """The demo's goals, each ``{"goal", "value", "chance", "times", "interval", "random_interval",
    "passed"}`` (one per direction for the cross-modal ones)."""
    out = []

    def add(goal, value, chance, times, interval, random_interval):
        beats_random = random_interval is None or interval[0] > random_interval[1]
        out.append({"goal": goal, "value": value, "chance": chance, "times": times, "interval": list(interval),
                    "random_interval": None if random_interval is None else list(random_interval),
                    "passed": bool(value >= times * chance and beats_random)})

    ct, cr = figures["class_trained"], figures["class_random"]
    it, ir = figures["instance_trained"], figures["instance_random"]
    name = f"R@{RECALL_K}"
    for key, title in DIRECTIONS:
        add(f"{title} class precision@1 >= {CLASS_TIMES:g}x chance, above the random network",
            ct[key], ct["chance"], CLASS_TIMES, ct["interval"][key], cr["interval"][key])
    for key, title in DIRECTIONS:
        add(f"{title} recall@{RECALL_K} >= {RECALL_TIMES:g}x chance, above the random network",
            it[key][name], it["chance"][name], RECALL_TIMES, it["interval"][key][name], ir["interval"][key][name])
    lt = figures["linear_trained"]
    add(f"linear probe >= {PROBE_TIMES:g}x chance", lt["held_out_top1"], lt["chance"], PROBE_TIMES, lt["interval"],
        None)
    return out


def summary(figures: Dict[str, object], out: str) -> str:
    """The demo's closing table, its goals and verdict."""
    n = figures["instance_trained"]["num_queries"]
    lines = ["", f"avidfast demo: what Cross-AVID learned, on {n} held-out clips of a second synthetic set "
             f"({figures['num_classes']} classes; 95% intervals)",
             f"  {'':<44}{'trained network':>24}{'random network':>24}{'chance':>9}"]
    for what, t, ti, r, ri, chance in rows(figures):
        lines.append(f"  {what:<44}{_with_interval(t, ti):>24}{_with_interval(r, ri):>24}{100 * chance:8.1f}%")
    mt, mr = figures["memory_trained"], figures["memory_random"]
    lines.append("  memory-bank probe on the training set, video / audio: trained "
                 f"{_pct(mt['mean']['video'])} / {_pct(mt['mean']['audio'])}, random "
                 f"{_pct(mr['mean']['video'])} / {_pct(mr['mean']['audio'])}")
    lines.append("  goals:")
    for g in figures["goals"]:
        lines.append(f"    [{'pass' if g['passed'] else 'FAIL'}] {g['goal']}: {_pct(g['value'])} = "
                     f"{g['value'] / g['chance']:.1f}x chance")
    verdict = "learned" if figures["verdict"] else "did NOT reach every goal"
    lines.append(f"  verdict: {verdict}; pictures in {out}: loss_curve.png, retrieval_grid.png, "
                 "similarity_matrix.png")
    lines.append(f"  TensorBoard: tensorboard --logdir {os.path.join(out, 'train', 'tb')}")
    return "\n".join(lines)


def readme_table(figures: Dict[str, object]) -> str:
    """The README's demo table (Markdown) from results.json's figures."""
    n = figures["instance_trained"]["num_queries"]
    lines = [f"| on {n} held-out clips (95% interval) | trained network | random network | chance |",
             "|---|---|---|---|"]
    for what, t, ti, r, ri, chance in rows(figures):
        lines.append(f"| {what} | {_compact(t, ti)} | {_compact(r, ri)} | {_pct(chance)} |")
    return "\n".join(lines)


def readme_status(figures: Dict[str, object]) -> str:
    """The sentence of the README's status paragraph about the demo."""
    failed = [g["goal"] for g in figures["goals"] if not g["passed"]]
    ct, lt, lr = figures["class_trained"], figures["linear_trained"], figures["linear_random"]
    it = figures["instance_trained"]
    name = f"R@{RECALL_K}"
    return (f"`make demo` learns audio-visual correspondence on this 2-core CPU: on "
            f"{it['num_queries']} held-out clips the trained network finds a clip's own sound among all of "
            f"them in its top {RECALL_K} {_pct(it['v2a'][name])} of the time (chance {_pct(it['chance'][name])}), "
            f"the nearest sound comes from the picture's class {_pct(ct['v2a'])} of the time (chance "
            f"{_pct(ct['chance'])}), and a linear probe on its video features reaches {_pct(lt['held_out_top1'])} "
            f"(chance {_pct(lt['chance'])}, the same network at initialisation {_pct(lr['held_out_top1'])}). "
            f"{len(figures['goals']) - len(failed)} of its {len(figures['goals'])} goals hold"
            + (f"; not reached: {'; '.join(failed)}." if failed else "."))


README_BLOCKS = {"demo-status": readme_status, "demo-table": readme_table}


def readme_with_demo(readme: str, figures: Dict[str, object]) -> str:
    """``readme`` (the README's text) with the text between each ``<!-- NAME -->`` and
    ``<!-- /NAME -->`` marker of :data:`README_BLOCKS` rendered afresh from ``figures``.
    Raises ValueError naming a marker that is missing."""
    for name, render in README_BLOCKS.items():
        start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if readme.count(start) != 1 or readme.count(end) != 1 or readme.index(start) > readme.index(end):
            raise ValueError(f"the README needs exactly one {start} ... {end} block")
        head, rest = readme.split(start)
        _, tail = rest.split(end)
        readme = f"{head}{start}\n{render(figures)}\n{end}{tail}"
    return readme
