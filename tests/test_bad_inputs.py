"""Every anticipated bad input ends in one line that names the file, key or value, and a
non-zero exit: never a traceback (issue 24, fifth class). One table, run through `dbp`'s
entry point; the traceback-free exit of a real process is checked for a few of them."""
import subprocess
import sys
from pathlib import Path

import pytest

from dbp.cli import main
from dbp.datasets import check_readable
from dbp.embedded import make_embedded


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tiny embedded data, a copy whose training JPEGs lost their last bytes (their headers
    still read: met at the first batch, not at start-up), and a few broken files."""
    d = tmp_path_factory.mktemp("bad")
    make_embedded(d / "emb", seed=0, imagenet_per_class=4, imagenet_val_per_class=1, ade_train=4,
                  ade_val=1, image_size=32)
    import shutil
    shutil.copytree(d / "emb" / "imagenet", d / "cut")
    for f in (d / "cut" / "train").rglob("*.JPEG"):
        whole = f.read_bytes()
        f.write_bytes(whole[:-30])
        if check_readable(f.parent, [f.name]):  # the start-up check would see this one: keep it whole
            f.write_bytes(whole)
    shutil.copytree(d / "emb" / "imagenet", d / "empty")
    for f in (d / "empty" / "train").rglob("*.JPEG"):
        f.write_bytes(b"not an image")
    (d / "file").write_text("a file, not a folder\n")
    (d / "bad.yaml").write_text("pretrain: [1,\n")
    (d / "final.pt").write_bytes(b"garbage")
    return d


def _train(root: Path, *more: str) -> list[str]:
    sets = [f"data.root={root}", "data.kind=imagenet", "data.num_workers=0", "pretrain.batch_size=8",
            "pretrain.steps=4", "pretrain.warmup_steps=1", "pretrain.eval_every=2", "energy.enabled=false",
            *more]
    return [w for kv in sets for w in ("--set", kv)]


# (id, argv with {d} for the fixture folder, what the line must say)
CASES = [
    ("missing config", ["config", "--config", "{d}/nope.yaml"], "{d}/nope.yaml: config file not found"),
    ("bad yaml", ["config", "--config", "{d}/bad.yaml"], "{d}/bad.yaml: not valid YAML at line 2"),
    ("unknown key", ["config", "--set", "pretrain.stepz=3"], "pretrain.stepz: unknown key"),
    ("malformed override", ["config", "--set", "pretrain.steps"], "pretrain.steps: override must look like"),
    ("bad value", ["config", "--set", "data.fraction=2"], "data.fraction: must be in (0, 1]"),
    ("unknown arm", ["pretrain", "--arm", "nope", "--seed", "0", "--out", "{d}/r"], "--arm: "),
    ("missing data root", ["data", "subset", "--set", "data.kind=imagenet", "--set", "data.root={d}/none",
                           "--seed", "0", "--out", "{d}/m.txt"], "ImageNet folder {d}/none/train does not exist"),
    ("missing manifest", ["pretrain", *_train(Path("{d}/emb/imagenet")), "--manifest", "{d}/none.txt",
                          "--arm", "bp", "--seed", "0", "--out", "{d}/r1"], "{d}/none.txt: No such file"),
    ("unwritable output", ["pretrain", *_train(Path("{d}/emb/imagenet")), "--arm", "bp", "--seed", "0",
                           "--out", "{d}/file/run"], "{d}/file/run: Not a directory"),
    ("truncated jpeg at the first batch", ["pretrain", *_train(Path("{d}/cut")), "--arm", "bp", "--seed", "0",
                                           "--out", "{d}/r2"], "image file is truncated"),
    ("truncated jpeg in a loader worker", ["pretrain", *_train(Path("{d}/cut"), "data.num_workers=1"),
                                           "--arm", "bp", "--seed", "0", "--out", "{d}/r3"],
     "image file is truncated"),
    ("no readable image", ["pretrain", *_train(Path("{d}/empty")), "--arm", "bp", "--seed", "0",
                           "--out", "{d}/r4"], "76 unreadable image(s) under {d}/empty"),
    ("missing tuned file", ["pretrain", *_train(Path("{d}/emb/imagenet")), "--tuned", "{d}/none.json",
                            "--arm", "bp", "--seed", "0", "--out", "{d}/r5"], "{d}/none.json: not a selected-values file"),
    ("missing step file", ["pretrain", "--steps-from", "{d}/none.json", "--arm", "bp", "--seed", "0",
                           "--out", "{d}/r6"], "{d}/none.json: not a step-count file"),
    ("stepcost missing manifest", ["stepcost", *_train(Path("{d}/emb/imagenet")), "--seed", "0",
                                   "--manifest", "{d}/none.txt", "--out", "{d}/rounds.csv"], "{d}/none.txt: No such file"),
    ("export of no run", ["export", "--pretrain-run", "{d}/none", "--out", "{d}/x.pth"], "{d}/none not found"),
    ("export of a corrupt file", ["export", "--pretrain-run", "{d}/final.pt", "--out", "{d}/x.pth"], "{d}/final.pt"),
    ("summarize no results", ["summarize", "--results", "{d}/none"], "{d}/none: no pre-training runs"),
    ("figures no results", ["figures", "--results", "{d}/none"], "{d}/none: no such results folder"),
    ("select no trials", ["select", "--results", "{d}/none", "--out", "{d}/s.json"], "tuning trials of arm 'bp' missing"),
    ("reproduce no tables", ["reproduce", "--reference", "{d}/none", "--results", "{d}/none"], "{d}/none/speedups.csv: missing"),
    ("more GPUs than the machine has", ["gpus", "64", "--", "dbp", "config"], "the job needs 64 GPU(s) but this machine has"),
    ("gpus without a command", ["gpus", "1"], "no command to run"),
    ("gpus with an unknown command", ["gpus", "0", "--", "no-such-command-here"], "no-such-command-here"),
    ("probe encoder without a path", ["probe", "--encoder", "bp", "--seed", "0", "--out", "{d}/p"],
     "--encoder 'bp': must look like NAME=PATH"),
]


@pytest.mark.parametrize("argv,says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line(data, argv, says):
    argv = [a.replace("{d}", str(data)) for a in argv]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    line = stop.value.code
    assert isinstance(line, str) and "\n" not in line and "Traceback" not in line, line
    assert line.startswith(f"dbp {argv[0]}: ") and says.replace("{d}", str(data)) in line, line


def test_a_real_process_prints_the_line_alone(data):
    """The same through a real interpreter: exit 1, the line on stderr, no traceback (here
    for an error met inside a loader worker process)."""
    argv = [a.replace("{d}", str(data)).replace("/r3", "/r3-process") for a in CASES[10][1]]
    out = subprocess.run([sys.executable, "-m", "dbp", *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("dbp pretrain: ") and "image file is truncated" in line and "cut" in line
