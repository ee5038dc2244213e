"""Typed study configuration, validated once at the edge (CLI / Snakefile).

A YAML file maps onto `StudyConfig` (frozen pydantic dataclasses: types and ranges on the
fields, rules across fields in `validate`); every unknown key, wrong type or out-of-range
value fails at load time with one line naming the key (e.g. `pretrain.batch_size: must be
>= 1, got 0`). The library below this layer takes the resulting dataclasses or plain values.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AllowInfNan, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from dbp.arms import UnknownArmError, controls, get_arm
from dbp.presets import PRESETS
from dbp.seg_recipe import OVERRIDABLE

ENCODER_LAYERS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
PATCH_EMBED = r"patch_embed\.proj"
DEFAULT_ARMS = ("bp", "dbp", "identity")  # `arms:` takes any registered arm (dbp/arms/)
# Controls are not tuned and get no budget ladder: they take the winner of the arm they
# control (identity = BP's layers doing nothing, so its losses equal BP's exactly).
CONTROLS = controls()
ROLES = ("target", "tuning", "scored", "sweep")
FLOAT_TEXT = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"  # numbers PyYAML leaves as text (1e-3)


class ConfigError(ValueError):
    """A configuration problem, with the dotted key (or file) it concerns."""


class DataError(ConfigError):
    """A data file (image, annotation, manifest) that fails its check: the message names it."""


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _float(**bounds: float) -> Any:
    """A float within `bounds`: an int or numeric text (1e-3) will do, a bool or 'abc' will not."""
    return Annotated[float, Field(**bounds), Strict(), AllowInfNan(False), BeforeValidator(
        lambda v: float(v) if isinstance(v, str) and re.match(FLOAT_TEXT, v) else v)]


# Strict scalars: no bool for an int, no 1.0 or "1" for an int, no "yes" for a bool.
Int, Bool, Str = Annotated[int, Strict()], Annotated[bool, Strict()], Annotated[str, Strict()]
Count, Index = Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=0)]
PosFloat, NonNegFloat = _float(gt=0), _float(ge=0)
Fraction, Unit = _float(gt=0, le=1), _float(ge=0, le=1)          # (0, 1], [0, 1]
OpenUnit, Rate = _float(gt=0, lt=1), _float(ge=0, lt=1)          # (0, 1), [0, 1)
_section = functools.partial(dataclass, frozen=True, config=ConfigDict(extra="forbid"))


@_section
class DataConfig:
    kind: Literal["embedded", "imagenet"] = "embedded"
    root: Str = "data/embedded"          # embedded: made here on demand; imagenet: train/ val/
    embedded_seed: Int = 0               # generator seed of the embedded data
    fraction: Fraction = 1.0             # subset of train images, sampled per run seed
    class_balanced: Bool = False
    on_error: Literal["raise", "skip"] = "raise"  # corrupt images: stop, or skip and count
    image_size: Count = 32               # must equal the model preset's input size
    val_images: Count | None = None      # a fixed sample spread over classes (None: all)
    num_workers: Index = 2
    cache_images: Bool = False           # keep decoded images in memory for the run (small data only)

    def validate(self, key: str) -> None:
        if self.kind == "imagenet":
            for split in ("train", "val"):
                _require(Path(self.root, split).is_dir(), f"{key}.root",
                         f"ImageNet folder {Path(self.root, split)} does not exist")


@_section
class PretrainConfig:
    model: Str = "mae_vit_tiny_patch4_32"  # a dbp.presets.PRESETS name
    mask_ratio: OpenUnit = 0.75
    norm_pix_loss: Bool = True
    batch_size: Count | None = 64        # per device and micro-step; null: from global_batch
    global_batch: Count | None = None    # per optimizer step over all devices (then batch_size: null)
    accum_steps: Count = 1
    steps: Count = 300                   # optimizer steps
    blr: PosFloat = 1.6e-2               # lr = blr * effective batch / 256
    warmup_steps: Index = 30             # < steps
    min_lr: NonNegFloat = 0.0
    weight_decay: NonNegFloat = 0.05
    beta2: Rate = 0.95
    clip_grad: PosFloat | None = None
    eval_every: Count = 15               # validation points every N steps (shared by all arms)
    checkpoint_every: Count = 50
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA if supported
    compile: Bool = False
    # numerics replicate: initial weights x (1 + perturb x N(0, 1)), from a generator of its own
    # (docs/protocol.md rule 5): a rate whose result moves with a 1e-6 nudge is chaotic
    perturb: _float(ge=0, le=1e-3) = 0.0

    def validate(self, key: str) -> None:
        _require(self.model in PRESETS, f"{key}.model",
                 f"unknown model {self.model!r}; choose one of {sorted(PRESETS)}")
        _require(self.warmup_steps < self.steps, f"{key}.warmup_steps",
                 f"must be in [0, steps), got {self.warmup_steps} with steps {self.steps}")
        _require((self.batch_size is None) != (self.global_batch is None), f"{key}.global_batch",
                 "set exactly one of batch_size (per device) and global_batch (over all devices), "
                 f"the other null; got batch_size {self.batch_size}, global_batch {self.global_batch}")
        if self.global_batch is not None:
            _require(self.global_batch % self.accum_steps == 0, f"{key}.global_batch",
                     f"{self.global_batch} does not split into {self.accum_steps} accum_steps")

    def device_batch(self, world: int) -> int:
        """Images per device and micro-step: batch_size, or global_batch split over `world`
        devices and accum_steps micro-steps, so that the GPU count a job is launched with
        cannot change the recipe (lr, steps and epochs follow the global batch)."""
        if self.global_batch is None:
            return self.batch_size
        per, rest = divmod(self.global_batch, world * self.accum_steps)
        _require(rest == 0, "pretrain.global_batch", f"{self.global_batch} does not split into "
                 f"{world} device(s) x {self.accum_steps} accum_steps")
        return per


@_section
class DBPConfig:
    include: Annotated[tuple[Str, ...], Field(min_length=1)] = (ENCODER_LAYERS,)  # layer-name regexes
    patch_embed: Bool = False            # also decorrelate the patch embedding
    fused: Bool = True
    sample_frac: Fraction = 0.1
    replacement: Bool = False
    decor_lr: NonNegFloat = 1e-3
    kappa: Unit = 1e-3
    variant: Literal["standard", "normalized"] = "standard"
    variance_term: Literal["row", "column"] = "row"
    center: Bool = False
    stabilize: Literal["none", "project"] = "none"
    every: Count = 1                     # R update every k optimizer steps

    def patterns(self) -> list[str]:
        return [*self.include, *([PATCH_EMBED] if self.patch_embed else [])]

    def layer_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("fused", "sample_frac", "replacement", "decor_lr",
                                               "kappa", "variant", "variance_term", "center",
                                               "stabilize")}


@_section
class EnergyConfig:
    enabled: Bool = True
    country_iso_code: Str = "NLD"
    measure_power_secs: PosFloat = 1.0  # codecarbon's power-sampling interval (its task-mode rate)
    fallback_watts: NonNegFloat = 18.0  # used only if codecarbon fails: its own CPU+RAM estimate here

    def validate(self, key: str) -> None:
        _require(len(self.country_iso_code) == 3, f"{key}.country_iso_code", "must be ISO-3166 alpha-3")


@_section
class FinetuneConfig:
    """Segmentation fine-tuning of each pre-trained encoder (UperNet through mmseg). The
    recipe keys (iterations, lr, ...) replace the preset's values; null keeps the preset's."""
    enabled: Bool = True
    preset: Literal["cpu_tiny", "paper", "paper_mae"] = "cpu_tiny"  # dbp.seg_recipe.SEG_PRESETS
    kind: Literal["embedded", "ade20k"] = "embedded"
    root: Str = "data/embedded"            # embedded: made on demand; ade20k: ADEChallengeData2016/
    embedded_seed: Int = 0
    fraction: Fraction = 1.0               # of the training images; the paper: 0.10 of ADE20K
    iterations: Count | None = None        # None: the preset's, scaled by `fraction`
    lr: PosFloat | None = None             # peak AdamW learning rate
    layer_decay: Fraction | None = None    # lr factor per encoder block below the top
    warmup: Index | None = None            # linear warm-up iterations
    drop_path_rate: Rate | None = None     # stochastic depth of the encoder
    weight_decay: NonNegFloat | None = None  # AdamW weight decay
    num_workers: Index = 0
    seeds: Count = 3                       # fine-tune the encoders of the first N scored seeds

    def validate(self, key: str) -> None:
        if self.kind == "ade20k":
            _require(Path(self.root, "objectInfo150.txt").is_file(), f"{key}.root",
                     f"{self.root} is not an ADE20K folder (no objectInfo150.txt)")

    def recipe_overrides(self) -> dict[str, Any]:
        """The recipe values set here (not None), to replace the preset's."""
        return {k: getattr(self, k) for k in OVERRIDABLE if getattr(self, k) is not None}


@_section
class ProbeConfig:
    """Linear segmentation probe of each frozen encoder (dbp.seg_probe) on the fine-tuning data
    (finetune.kind, root): the downstream measure that separates encoders where fine-tuning
    from scratch matches fine-tuning a pre-trained encoder (docs/downstream.md)."""
    enabled: Bool = True
    seeds: Count = 6                       # probe the encoders of the first N scored seeds
    heads: Count = 3                       # head seeds per encoder; its score is their mean
    train_images: Count = 250              # a fixed sample of the training images, every arm alike
    steps: Count = 1000                    # AdamW steps per head
    lr: PosFloat = 1e-2                    # peak lr (one cycle)
    batch_tokens: Count = 1024             # patches per step
    blocks: tuple[Index, ...] | None = None  # blocks whose outputs are concatenated (None: UperNet's)
    whiten: Bool = False                   # whiten the features instead of standardising each
    tiles: Count = 2                       # each image is resized to tiles x tiles encoder inputs
    equal_compute: tuple[Str, ...] = ("dbp",)  # also pre-train BP for each one's wall-clock, and probe it

    def validate(self, key: str, depth: int) -> None:
        blocks = self.blocks or ()
        _require(bool(self.blocks) or depth >= 4, f"{key}.blocks",
                 f"name the blocks to probe: UperNet's 4 taps need 4 blocks, the encoder has {depth}")
        _require(all(b < depth for b in blocks) and len(set(blocks)) == len(blocks), f"{key}.blocks",
                 f"must be distinct blocks of the {depth}-block encoder, got {list(blocks)}")

    def recipe(self) -> dict[str, Any]:
        """The settings that decide a probe's score (not which encoders are probed)."""
        return {k: getattr(self, k) for k in ("heads", "train_images", "steps", "lr",
                                               "batch_tokens", "blocks", "whiten", "tiles")}


Grid = dict[Str, tuple[Any, ...]]  # dotted key -> values


def _grid_points(grid: Grid) -> list[tuple[tuple[str, Any], ...]]:
    """Every point of a grid (dotted key -> values) as ((key, value), ...), in grid order."""
    keys = list(grid)
    return [tuple(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _check_grid(grid: Grid, key: str, sections: tuple[str, ...]) -> None:
    _require(bool(grid), f"{key}.grid", "needs at least one key")
    for k, values in grid.items():
        _require(k.split(".")[0] in sections and k.count(".") == 1, f"{key}.grid.{k}",
                 f"keys look like {' or '.join(s + '.<key>' for s in sections)}")
        _require(len(values) > 0, f"{key}.grid.{k}", "needs at least one value")


@_section
class SeedsConfig:
    """Disjoint seed sets, one per run role (docs/protocol.md rules 1, 5, 8): the runs that
    set the target, tune the arms and are scored never share a seed."""
    scored: tuple[Index, ...] = tuple(range(6))
    target: tuple[Index, ...] = (100, 101, 102, 103, 104)
    tuning: tuple[Index, ...] = (200,)

    def validate(self, key: str) -> None:
        for role in ("scored", "target", "tuning"):
            seeds = getattr(self, role)
            _require(len(set(seeds)) == len(seeds), f"{key}.{role}", f"repeated seeds in {list(seeds)}")
        _require(bool(self.scored), f"{key}.scored", "needs at least one seed")
        _require(bool(self.target), f"{key}.target", "needs at least one seed (the protocol asks for 5)")
        for a, b in itertools.combinations(("scored", "target", "tuning"), 2):
            shared = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            _require(not shared, f"{key}.{a}", f"shares seeds {shared} with {key}.{b}: "
                     "the roles need disjoint seeds")


@_section
class TuningConfig:
    """The same declared grid for every tuned arm (rule 5), each trial a fully decayed run of
    the base budget on every tuning seed, and beside it a numerics replicate (initial weights
    nudged by `replicate`, 0: none); the winner per arm (lowest mean final loss among the
    stable grid points) feeds the target-setting and scored runs. A point is unstable when a
    trial diverges, spikes, or its replicate ends more than `tolerance` (relative) away.
    `enabled: false` pins the config's values (the report says so)."""
    enabled: Bool = True
    grid: Grid = field(default_factory=lambda: {"pretrain.blr": (4e-3, 8e-3, 1.6e-2)})
    replicate: _float(ge=0, le=1e-3) = 1e-6
    tolerance: Fraction = 2e-3

    def validate(self, key: str) -> None:
        if self.enabled:
            _check_grid(self.grid, key, ("pretrain",))
            _require("pretrain.perturb" not in self.grid, f"{key}.grid.pretrain.perturb",
                     "is the numerics replicate's: set tuning.replicate instead")

    def points(self) -> list[tuple[tuple[str, Any], ...]]:
        """Every trial's overrides: each grid point, then its replicate (where there is one)."""
        rep = (("pretrain.perturb", self.replicate),) if self.replicate else None
        return [q for p in _grid_points(self.grid) for q in ((p, p + rep) if rep else (p,))]


@_section
class BudgetsConfig:
    """Extra fully decayed runs at `scales` x pretrain.steps (warm-up scaled alike) for every
    non-control arm on the first `seeds` scored seeds: with the base runs, a budget curve
    per arm (rule 9)."""
    scales: tuple[PosFloat, ...] = (0.5, 1.5)
    seeds: Index = 6

    def validate(self, key: str) -> None:
        _require(1.0 not in self.scales, f"{key}.scales",
                 f"must be > 0 and not 1 (the base budget is always run), got {list(self.scales)}")
        _require(len(set(self.scales)) == len(self.scales), f"{key}.scales", "repeated scales")


@_section
class StepCostConfig:
    """The side-by-side step-time measurement (dbp stepcost) that turns steps into
    wall-clock for the headline: `rounds` timed rounds, one turn per arm each, after
    `warmup` untimed ones."""
    rounds: Annotated[Int, Field(ge=3)] = 100
    warmup: Index = 3


@_section
class JobsConfig:
    """How the workflow packs runs into jobs (never what a run computes: not in any digest).
    `group_runs`: runs that read the same inputs run one after another in one process
    (dbp.jobs): the start-up (imports, codecarbon's hardware probe: about 6 s on 2 cores) is
    paid once a job, not once a run. false: one job per run, for clusters with GPUs to run
    them side by side."""
    group_runs: Bool = True


@_section
class SweepConfig:
    """Exploratory pre-training runs (role "sweep", on the tuning seeds, never scored): the
    cartesian product of `grid` (e.g. dbp.decor_lr x dbp.kappa) for each arm in `arms`."""
    arms: tuple[Str, ...] = ("dbp",)
    grid: Grid = field(default_factory=dict)

    def validate(self, key: str) -> None:
        _check_grid(self.grid, key, ("pretrain", "dbp"))


# A study's name: a folder under results/ and a word on every job's command line, never code.
STUDY_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
# The switches that pick CPU kernels (ATen's, MKL's, oneDNN's), and the environment a
# reproduction may set for its jobs: those and the thread count.
KERNEL_SWITCHES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
NUMERICS_ENV = (*KERNEL_SWITCHES, "OMP_NUM_THREADS")


@_section
class ReproduceConfig:
    """A reproduction of another study under other numerics (docs/protocol.md rule 14): `of`
    names the reference study (results/<of>), `env` the kernel switches every job of this
    study runs with (e.g. ATEN_CPU_CAPABILITY: avx2 on an AVX-512 machine). The DAG then
    ends in a `reproduce` job that sets this study's winners and conclusions beside the
    reference's."""
    of: Str | None = None
    env: dict[Str, Str] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        for k, v in self.env.items():
            _require(k in NUMERICS_ENV, f"{key}.env.{k}", f"not a numerics switch; choose from {list(NUMERICS_ENV)}")
            _require(re.fullmatch(r"[A-Za-z0-9_]+", v) is not None, f"{key}.env.{k}",
                     f"letters, digits and _ only, got {v!r}")
        _require(self.of is None or re.fullmatch(STUDY_NAME, self.of) is not None,
                 f"{key}.of", f"a study name (letters, digits, _ and -), got {self.of!r}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One pre-training run family of the study: an arm with overrides (a tuning trial, a
    budget, a sweep point) on a set of seeds. `tuned`: reads the selected values."""
    run_id: str
    arm: str
    overrides: tuple[tuple[str, Any], ...]
    seeds: tuple[int, ...]
    tuned: bool = True
    sweep: str | None = None
    kind: Literal["base", "budget", "trial", "sweep", "downstream"] = "base"

    def set_args(self) -> list[str]:
        """The overrides as `dbp pretrain --set` values."""
        return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for k, v in self.overrides]


@_section
class StudyConfig:
    name: Str = "default"
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    arms: tuple[Str, ...] = DEFAULT_ARMS
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dbp: DBPConfig = field(default_factory=DBPConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    stepcost: StepCostConfig = field(default_factory=StepCostConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    # per-arm pinned overrides of the pretrain section, e.g. {"dbp": {"blr": 8e-3}}
    arm_overrides: dict[Str, dict[Str, Any]] = field(default_factory=dict)
    sweeps: dict[Str, SweepConfig] = field(default_factory=dict)

    def validate(self, key: str = "") -> None:
        """The rules that span fields or sections (types and ranges are checked on parsing)."""
        _require(re.fullmatch(STUDY_NAME, self.name) is not None, "name",
                 f"letters, digits, _ and - only, starting with a letter or digit (it names "
                 f"results/<name> and reaches every job's command line), got {self.name!r}")
        self._check_arms()
        _require("bp" in self.arms, "arms", "needs bp: the baseline sets the target")
        for sub in ("seeds", "data", "pretrain", "energy", "finetune", "tuning", "budgets", "reproduce"):
            getattr(self, sub).validate(sub)
        _require(not (self.tuning.enabled and not self.seeds.tuning), "seeds.tuning",
                 "needs at least one seed while tuning.enabled is true")
        _require(self.budgets.seeds <= len(self.seeds.scored), "budgets.seeds",
                 f"must be <= the {len(self.seeds.scored)} scored seeds")
        _require(self.finetune.seeds <= len(self.seeds.scored), "finetune.seeds",
                 f"must be <= the {len(self.seeds.scored)} scored seeds")
        _require(self.probe.seeds <= len(self.seeds.scored), "probe.seeds",
                 f"must be <= the {len(self.seeds.scored)} scored seeds")
        _require(not self.probe.enabled or set(self.probe.equal_compute) <= set(self.tuned_arms()) - {"bp"},
                 "probe.equal_compute", f"BP gets the wall-clock of tuned arms of the study "
                 f"{sorted(set(self.tuned_arms()) - {'bp'})}, got {list(self.probe.equal_compute)}")
        for arm in self.arms:
            key = f"arm_overrides.{arm}.model" if "model" in self.arm_overrides.get(arm, {}) \
                else "pretrain.model"
            model = self.pretrain_for(arm).model  # validates the merged section
            size = PRESETS[model]["img_size"]
            _require(self.data.image_size == size, "data.image_size",
                     f"must equal the input size of {key} {model!r} ({size}), got {self.data.image_size}")
            if self.finetune.enabled:
                _require(PRESETS[model]["depth"] >= 4, key,
                         "fine-tuning (UperNet) needs at least 4 encoder blocks")
            if self.probe.enabled:
                self.probe.validate("probe", PRESETS[model]["depth"])
        for arm in self.arm_overrides:
            self.pretrain_for(arm)  # validates the merged section
        for name, sweep in self.sweeps.items():
            sweep.validate(f"sweeps.{name}")
            _require(bool(self.seeds.tuning), "seeds.tuning", "sweeps run on the tuning seeds: add one")
        for run in self.runs().values():  # every trial, budget and sweep point must make a valid config
            if run.overrides:
                self.with_overrides(run)

    def _check_arms(self) -> None:
        """Every arm name is registered (one line naming the known arms), listed once, and
        a control comes with the arm it controls."""
        named = [(f"arms[{i}]", a) for i, a in enumerate(self.arms)]
        named += [(f"arm_overrides.{a}", a) for a in self.arm_overrides]
        named += [(f"sweeps.{s}.arms[{i}]", a) for s, sweep in self.sweeps.items()
                  for i, a in enumerate(sweep.arms)]
        for key, name in named:
            try:
                get_arm(name)
            except UnknownArmError as e:
                raise ConfigError(f"{key}: {e}") from None
        _require(len(set(self.arms)) == len(self.arms), "arms", f"repeated arms in {list(self.arms)}")
        for i, name in enumerate(self.arms):
            of = CONTROLS.get(name)
            _require(of is None or of in self.arms, f"arms[{i}]",
                     f"{name} is a control of {of}: list {of} too")

    def tuned_arms(self) -> list[str]:
        """Arms that get the tuning grid: every arm but the controls."""
        return [a for a in self.arms if a not in CONTROLS]

    def runs(self) -> dict[str, Run]:
        """Every pre-training run family: the arms (scored seeds; BP also on the target
        seeds), the budget ladder, the tuning trials and the sweep points."""
        s, p = self.seeds, self.pretrain
        out = {a: Run(a, a, (), s.scored + (s.target if a == "bp" else ())) for a in self.arms}

        def add(run: Run, where: str) -> None:
            _require(run.run_id not in out, where, f"run {run.run_id} is defined twice")
            out[run.run_id] = run
        budget_seeds = s.scored[:self.budgets.seeds]
        for scale in self.budgets.scales if budget_seeds else ():
            steps = max(1, round(scale * p.steps))
            point = (("pretrain.steps", steps), ("pretrain.warmup_steps", round(scale * p.warmup_steps)))
            for arm in self.tuned_arms():
                add(Run(f"{arm}__steps={steps}", arm, point, budget_seeds, kind="budget"), "budgets.scales")
        if self.tuning.enabled:
            for point in self.tuning.points():
                for arm in self.tuned_arms():
                    add(Run(_run_id(arm, point), arm, point, s.tuning, tuned=False, kind="trial"),
                        "tuning.grid")
        for name, sweep in self.sweeps.items():
            for point in _grid_points(sweep.grid):
                for arm in sweep.arms:
                    add(Run(_run_id(arm, point), arm, point, s.tuning, sweep=name, kind="sweep"),
                        f"sweeps.{name}")
        return out

    def role(self, run: Run, seed: int) -> str:
        """The role of one run (rule 1, 5, 8): decided by the seed set it belongs to."""
        if seed in self.seeds.scored:
            return "scored"
        if seed in self.seeds.target:
            return "target"
        return "sweep" if run.sweep else "tuning"

    def with_overrides(self, run: Run) -> StudyConfig:
        """The study config as this run sees it (its overrides applied, validated)."""
        raw = to_dict(self)
        for k, v in run.overrides:
            section, leaf = k.split(".")
            raw[section][leaf] = v
        try:
            cfg = config_from_dict({**raw, "sweeps": {}, "budgets": {"scales": [], "seeds": 0},
                                    "tuning": {**raw["tuning"], "enabled": False}})
        except ConfigError as e:
            raise ConfigError(f"run {run.run_id}: {e}") from None
        return cfg

    def finetune_arms(self) -> list[str]:
        """Encoders to fine-tune: each pre-trained arm and "scratch" (random init, the control
        that says whether pre-training helps at all). Not the controls: identity's encoder
        is bit-for-bit BP's, so its fine-tune would repeat BP's."""
        if not self.finetune.enabled:
            return []
        return [a for a in self.arms if a not in CONTROLS] + ["scratch"]

    def finetune_seeds(self) -> tuple[int, ...]:
        return self.seeds.scored[:self.finetune.seeds]

    def pretrain_for(self, arm: str) -> PretrainConfig:
        """The pretrain section with this arm's overrides applied (and validated)."""
        over = self.arm_overrides.get(arm, {})
        cfg = _parse(PretrainConfig, {**dataclasses.asdict(self.pretrain), **over},
                     f"arm_overrides.{arm}")
        cfg.validate(f"arm_overrides.{arm}")
        return cfg

    def dbp_for(self, arm: str) -> DBPConfig | None:
        """DBP settings of an arm, which derives them from the `dbp` section (dbp/arms/)."""
        return get_arm(arm).dbp_settings(self.dbp)

    def run_config(self, arm: str) -> dict[str, Any]:
        """What one run of `arm` trains with: the sections that change its weights and
        clock (the seed sets, tuning grid and fine-tuning are not among them), and the
        arm's optimizer settings."""
        dbp_cfg = self.dbp_for(arm)
        return {"name": self.name, "data": dataclasses.asdict(self.data),
                "pretrain": dataclasses.asdict(self.pretrain_for(arm)),
                "dbp": dataclasses.asdict(dbp_cfg) if dbp_cfg else None,
                "optimizer": get_arm(arm).optimizer.settings(),
                "energy": dataclasses.asdict(self.energy)}


def _run_id(arm: str, point: tuple[tuple[str, Any], ...]) -> str:
    return "__".join([arm, *(f"{k.split('.')[1]}={_short(v)}" for k, v in point)])


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------- parsing, one-line error messages

_SAYS = {  # pydantic's error type -> what the value must be
    "int_type": "must be an integer", "float_type": "must be a number", "finite_number": "must be finite",
    "bool_type": "must be true or false", "string_type": "must be a string", "tuple_type": "must be a list",
    "dict_type": "must be a mapping", "dataclass_type": "must be a mapping with keys {keys}",
    "literal_error": "must be {expected}", "invalid_key": "keys must be strings",
    "too_short": "needs at least {min_length} entry", "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}", "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}"}


def _parse(tp: type, raw: Any, prefix: str = "") -> Any:
    """`raw` as a `tp`, or a ConfigError: one line naming the first bad key, what it must be
    (its known keys and bounds read off the JSON schema) and what it got."""
    try:
        return tp.__pydantic_validator__.validate_python(raw)
    except ValidationError as e:
        err = e.errors()[0]
    loc, kind = err["loc"], err["type"]
    key = (prefix + "".join(f"[{p}]" if isinstance(p, int) else "" if p == "[key]" else f".{p}"
                            for p in loc)).lstrip(".") or "config"
    plain = lambda n: next(m for m in n.get("anyOf", [n]) if m.get("type") != "null")  # noqa: E731
    node = plain(json_schema(tp))
    for part in loc:
        if part in node.get("properties", {}):
            node = plain(node["properties"][part])
        elif "properties" not in node and part != "[key]":  # a list item or a mapping's value
            node = plain(node.get("items", node.get("additionalProperties")) or {})
    if kind == "unexpected_keyword_argument":
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(node['properties']))})")
    ctx = {k: _short(v) for k, v in err.get("ctx", {}).items()}  # > 0, not > 0.0
    what = _SAYS.get(kind, err["msg"]).format(**ctx, keys=", ".join(node.get("properties", ())))
    ends = [(k, node[k]) for k in ("exclusiveMinimum", "minimum", "exclusiveMaximum", "maximum")
            if k in node]
    if "than" in kind and len(ends) == 2:  # a range: say both ends
        (lo, low), (hi, high) = ends
        what = f"must be in {'[' if lo == 'minimum' else '('}{low}, {high}{']' if hi == 'maximum' else ')'}"
    raise ConfigError(f"{key}: {what}, got {err['input']!r}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["pretrain.steps=50", "dbp.kappa=0.5"]` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        _require(bool(sep) and bool(key), pair, "override must look like section.key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the studies a `base:` names


def read_study_file(path: str | Path) -> dict[str, Any]:
    """One study YAML file as a mapping (not yet merged with its base or validated)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = ("not UTF-8 text" if isinstance(e, UnicodeDecodeError)
                   else getattr(e, "problem", None) or str(e).splitlines()[0])
        raise ConfigError(f"{p}: not valid YAML{at}: {problem}") from None
    _require(isinstance(raw, dict), str(p), f"top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def with_base(raw: dict[str, Any], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A study mapping over the study its `base:` names, recursively: a name is a study of
    configs/ (`base: default`), anything else a YAML path. No `base:`, no inheritance: the
    typed defaults of this module fill what the file leaves out, so a study never takes
    another study's settings without saying so."""
    if raw.get("base") is None:
        return {k: v for k, v in raw.items() if k != "base"}
    base = str(raw["base"])
    path = Path(base) if ("/" in base or base.endswith((".yaml", ".yml"))) else CONFIG_DIR / f"{base}.yaml"
    _require(path.resolve() not in seen, "base", f"{path} is its own base (a circle)")
    under = with_base(read_study_file(path), (*seen, path.resolve()))
    return _merge(under, {k: v for k, v in raw.items() if k != "base"})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study file, put it over its base, merge overrides into it, type-check and
    validate: the config the study's jobs read (the Snakefile resolves it the same way)."""
    raw = read_study_file(path) if path is not None else {}
    return config_from_dict(with_base(_merge(raw, parse_overrides(overrides or []))))


def config_from_dict(raw: dict[str, Any]) -> StudyConfig:
    """Type-check and validate an already-merged mapping (e.g. Snakemake's `config`)."""
    cfg = _parse(StudyConfig, raw)
    cfg.validate()
    return cfg


def json_schema(tp: Any = StudyConfig) -> dict[str, Any]:
    """The JSON schema of a config type, from pydantic (one source of truth), in one piece:
    $refs inlined, floats also as YAML's text form (1e-3), no titles, docstrings or defaults
    (Snakemake's validate() would write defaults into its config, even into a bad section).
    workflow/schemas/study.schema.yaml is this, checked in (a test keeps them equal)."""
    schema = TypeAdapter(tp).json_schema()
    defs = schema.pop("$defs", {})

    def tidy(node: Any, names: bool = False) -> Any:
        if isinstance(node, list):
            return [tidy(v) for v in node]
        if not isinstance(node, dict) or names:  # names: property name -> schema
            return {k: tidy(v) for k, v in node.items()} if names else node
        node = {**defs.get(node.get("$ref", "").rpartition("/")[2], {}), **node}
        if node.get("type") == "number":
            node.update(type=["number", "string"], pattern=FLOAT_TEXT)
        keep = sorted((k for k in node if k not in ("title", "description", "default", "$ref")),
                      key=lambda k: k != "type")  # the type first
        return {k: tidy(node[k], k == "properties") for k in keep}
    return tidy(schema)


def with_tuned(cfg: StudyConfig, arm: str, values: dict[str, Any]) -> StudyConfig:
    """`cfg` with an arm's selected values (dotted pretrain keys) as its arm overrides."""
    raw = to_dict(cfg)
    over = raw["arm_overrides"].setdefault(arm, {})
    for k, v in values.items():
        section, leaf = k.split(".")
        _require(section == "pretrain", f"tuned value {k}", "only pretrain.<key> values can be tuned")
        over[leaf] = v
    return config_from_dict(raw)


def to_dict(cfg: StudyConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable form (for run.json provenance)."""
    return dataclasses.asdict(cfg)
