"""Tuning that floating-point noise cannot flip, on real training (docs/protocol.md rule 5): at a
chaotic learning rate a trial and its numerics replicate (initial weights nudged by 1e-6) end
apart, at a stable one they agree, and the selection never takes the chaotic rate, however its
trials happen to land on this machine."""
import subprocess
import sys

import pandas as pd
import pytest

from dbp import analysis as A
from dbp.embedded import make_embedded

pytestmark = pytest.mark.slow
STABLE, CHAOTIC = 0.004, 0.128  # blr: x2 apart from the default grid, and far past its edge


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two tuning seeds of BP at a stable and a chaotic rate, each with its replicate, run by
    `dbp pretrain-runs` as the workflow runs them."""
    tmp = tmp_path_factory.mktemp("tuning")
    root = make_embedded(tmp / "emb", seed=0, imagenet_per_class=8, imagenet_val_per_class=1,
                         ade_train=2, ade_val=1, image_size=32)
    cfg = tmp / "tiny.yaml"
    cfg.write_text(f"""
name: tiny
arms: [bp]
seeds: {{scored: [0], target: [100], tuning: [200, 201]}}
data: {{kind: imagenet, root: {root / 'imagenet'}, num_workers: 0, val_images: 16}}
pretrain: {{batch_size: 16, steps: 40, warmup_steps: 4, eval_every: 10, checkpoint_every: 40}}
tuning: {{grid: {{pretrain.blr: [{STABLE}, {CHAOTIC}]}}}}
energy: {{enabled: false}}
finetune: {{enabled: false, seeds: 1}}
probe: {{enabled: false, seeds: 1}}
budgets: {{scales: [], seeds: 0}}
""")
    results = tmp / "results"
    runs = [f"bp__blr={b:g}{r}" for b in (STABLE, CHAOTIC) for r in ("", "__perturb=1e-06")]
    subprocess.run([sys.executable, "-m", "dbp", "pretrain-runs", "--config", str(cfg), "--seed", "200", "201",
                    "--results", str(results), *runs], check=True, capture_output=True, timeout=900)
    return results, runs


def test_the_replicate_tells_a_chaotic_rate_from_a_stable_one(study):
    results, runs = study
    chosen = A.select_tuned(results, ["bp"], ["pretrain.blr"], [200, 201], {}, trials=runs)
    table = pd.DataFrame(chosen["table"]).set_index("run_id")
    stable, chaotic = table.loc[f"bp__blr={STABLE:g}"], table.loc[f"bp__blr={CHAOTIC:g}"]
    assert stable["replicate_gap"] < 1e-4 and stable["stable"]  # a nudge of 1e-6 stays ~1e-6
    assert chaotic["replicate_gap"] > 2e-3 and not chaotic["stable"]  # it moves the end >= 0.2 %
    assert chosen["arms"]["bp"]["values"] == {"pretrain.blr": STABLE}
