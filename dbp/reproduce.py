"""A study set beside the study it reproduces (docs/protocol.md rule 14): did the tuning pick
the same winners, and does every arm's headline reach the same conclusion with overlapping
intervals? Reads the two studies' records (speedups.csv, tuning/selected.json, downstream.csv,
one run.json each for the numerics): no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dbp.analysis import read_json, read_whole_csv
from dbp.config import KERNEL_SWITCHES


def _primary(results: Path) -> pd.DataFrame:
    path = results / "speedups.csv"
    if not path.is_file():
        raise ValueError(f"{path}: missing (run `dbp summarize --results {results}` first)")
    s = read_whole_csv(path)
    return s[(s["reading"] == "primary") & (s["relax"] == 0)].set_index("arm")


def _winners(results: Path) -> dict[str, str]:
    path = results / "tuning" / "selected.json"
    arms = read_json(path, ["arms"])["arms"] if path.is_file() else {}
    return {a: json.dumps(c["values"], sort_keys=True) for a, c in arms.items() if not c.get("from")}


def _numerics(results: Path) -> str:
    """The kernel set and threads a study's scored runs ran with (from one run.json)."""
    for path in sorted((results / "pretrain").glob("*/seed*/run.json")):
        info = read_json(path, ["role"])
        if info.get("role") == "scored":
            n = info.get("provenance", {}).get("numerics", {})
            env = " ".join(f"{k}={v}" for k, v in n.get("env", {}).items() if k in KERNEL_SWITCHES)
            return f"{n.get('cpu_capability', '?')} kernels, {n.get('threads', '?')} threads" + (f", {env}" if env else "")
    return "unknown numerics"


def _cell(r) -> str:
    return (f"{r['median']:.2f}x [{r['lo']:.2f}x, {r['hi']:.2f}x], p = {r['p_value']:.3g}: "
            f"{r['conclusion']}")


def _probe(results: Path) -> pd.Series:
    """Linear-probe mIoU difference (points) of each encoder against BP."""
    path = results / "downstream.csv"
    if not path.is_file():
        return pd.Series(dtype=float)
    d = read_whole_csv(path)
    if d.empty or "vs" not in d:  # a study without a downstream stage
        return pd.Series(dtype=float)
    d = d[(d["measure"] == "probe") & (d["vs"] == "bp")]
    return d.set_index("arm")[["mean", "lo", "hi"]].apply(tuple, axis=1) if len(d) else pd.Series(dtype=float)


def compare(reference: str | Path, results: str | Path) -> tuple[str, bool]:
    """(Markdown, reproduced?): the two studies' winners and conclusions side by side.
    Reproduced: the same winners, and for every arm overlapping intervals and the same
    conclusion."""
    ref, mine = Path(reference), Path(results)
    lines = [f"**Reproduction: {mine.name} ({_numerics(mine)}) beside {ref.name} ({_numerics(ref)}).**", "",
             "| Arm | Tuning winner, reference | this study | Same |", "|---|---|---|---|"]
    wr, wm = _winners(ref), _winners(mine)
    same_winners = True
    for arm in sorted(set(wr) | set(wm)):
        same = wr.get(arm) == wm.get(arm)
        same_winners &= same
        lines.append(f"| {arm} | {wr.get(arm, '–')} | {wm.get(arm, '–')} | {'yes' if same else 'NO'} |")
    pr, pm = _primary(ref), _primary(mine)
    lines += ["", "| Arm | Budget-curve speed-up, reference | this study | Intervals overlap | Same conclusion |",
              "|---|---|---|---|---|"]
    agree = True
    for arm in sorted(set(pr.index) | set(pm.index)):
        if arm not in pr.index or arm not in pm.index:
            agree = False
            lines.append(f"| {arm} | {_cell(pr.loc[arm]) if arm in pr.index else '–'} | "
                         f"{_cell(pm.loc[arm]) if arm in pm.index else '–'} | – | NO |")
            continue
        a, b = pr.loc[arm], pm.loc[arm]
        overlap = max(a["lo"], b["lo"]) <= min(a["hi"], b["hi"])
        same = a["conclusion"] == b["conclusion"]
        agree &= overlap and same
        lines.append(f"| {arm} | {_cell(a)} | {_cell(b)} | {'yes' if overlap else 'NO'} | {'yes' if same else 'NO'} |")
    qr, qm = _probe(ref), _probe(mine)
    if len(qr) and len(qm):
        lines += ["", "| Encoder | Linear probe vs BP (points), reference | this study |", "|---|---|---|"]
        for arm in sorted(set(qr.index) & set(qm.index)):
            fmt = lambda t: f"{100 * t[0]:+.1f} [{100 * t[1]:+.1f}, {100 * t[2]:+.1f}]"  # noqa: E731
            lines.append(f"| {arm} | {fmt(qr[arm])} | {fmt(qm[arm])} |")
    ok = same_winners and agree
    verdict = ("REPRODUCED: the same tuning winners, and every arm's interval overlaps with the same "
               "conclusion." if ok else "NOT REPRODUCED: " + "; ".join(
                   w for w, bad in (("another tuning winner", not same_winners),
                                    ("an arm's interval or conclusion differs", not agree)) if bad) + ".")
    return "\n".join([*lines, "", verdict, ""]), ok
