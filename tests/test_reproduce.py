"""A reproduction set beside its reference (dbp.reproduce): the verdict follows the winners,
the overlap of the intervals and the conclusions; the README shows the committed one."""
import json
from pathlib import Path

import pandas as pd
import pytest

from dbp.reproduce import compare

REPO = Path(__file__).resolve().parents[1]


def _study(root: Path, winners: dict, speedups: dict, capability: str) -> Path:
    (root / "tuning").mkdir(parents=True)
    (root / "tuning" / "selected.json").write_text(json.dumps({"arms": {
        **{a: {"values": {"pretrain.blr": v}} for a, v in winners.items()},
        "identity": {"values": {"pretrain.blr": winners["bp"]}, "from": "bp"}}}))
    pd.DataFrame([{"arm": a, "reading": r, "relax": 0.0, "median": m, "lo": lo, "hi": hi, "p_value": p,
                   "conclusion": "faster" if lo > 1 else "slower" if hi < 1 else "not resolved"}
                  for a, (m, lo, hi, p) in speedups.items() for r in ("primary", "protocol v2")]
                 ).to_csv(root / "speedups.csv", index=False)
    run = root / "pretrain" / "bp" / "seed0"
    run.mkdir(parents=True)
    run.joinpath("run.json").write_text(json.dumps({"role": "scored", "provenance": {"numerics": {
        "cpu_capability": capability, "threads": 2, "env": {"ATEN_CPU_CAPABILITY": capability.lower()}}}}))
    return root


@pytest.fixture
def reference(tmp_path):
    return _study(tmp_path / "default", {"bp": 0.004, "dbp": 0.008},
                  {"dbp": (1.10, 0.80, 1.60, 0.4), "cadamw": (1.30, 1.10, 1.50, 0.04)}, "AVX512")


def test_same_winners_and_conclusions_reproduce(reference, tmp_path):
    other = _study(tmp_path / "default-avx2", {"bp": 0.004, "dbp": 0.008},
                   {"dbp": (1.20, 0.90, 1.70, 0.3), "cadamw": (1.25, 1.05, 1.45, 0.04)}, "AVX2")
    text, ok = compare(reference, other)
    assert ok and text.rstrip().endswith("REPRODUCED: the same tuning winners, and every arm's "
                                         "interval overlaps with the same conclusion.")
    assert "**Reproduction: default-avx2 (AVX2 kernels, 2 threads, ATEN_CPU_CAPABILITY=avx2) beside " \
           "default (AVX512 kernels, 2 threads, ATEN_CPU_CAPABILITY=avx512).**" in text
    assert '| bp | {"pretrain.blr": 0.004} | {"pretrain.blr": 0.004} | yes |' in text
    assert "| dbp | 1.10x [0.80x, 1.60x], p = 0.4: not resolved | 1.20x [0.90x, 1.70x], p = 0.3: " \
           "not resolved | yes | yes |" in text
    assert "identity" not in text.split("| Arm | Budget")[0].split("| bp |")[1]  # controls copy bp


def test_another_winner_or_conclusion_does_not(reference, tmp_path):
    other = _study(tmp_path / "flipped", {"bp": 0.016, "dbp": 0.008},
                   {"dbp": (1.60, 1.30, 2.10, 0.03), "cadamw": (1.25, 1.05, 1.45, 0.04)}, "AVX2")
    text, ok = compare(reference, other)
    assert not ok and "| bp | {\"pretrain.blr\": 0.004} | {\"pretrain.blr\": 0.016} | NO |" in text
    assert "faster | yes | NO |" in text  # 0.80-1.60 and 1.30-2.10 overlap; the conclusion moved
    assert text.rstrip().endswith("NOT REPRODUCED: another tuning winner; an arm's interval or "
                                  "conclusion differs.")


def test_a_missing_summary_is_named(reference, tmp_path):
    with pytest.raises(ValueError, match="speedups.csv: missing"):
        compare(reference, tmp_path)


def test_readme_shows_the_committed_reproduction():
    committed = REPO / "results" / "default-avx2" / "reproduce.md"
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- reproduce:start -->")[1].split("<!-- reproduce:end -->")[0]
    assert block == "\n" + committed.read_text()
    assert compare(REPO / "results" / "default", REPO / "results" / "default-avx2")[0] == committed.read_text()
