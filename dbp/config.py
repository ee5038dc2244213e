"""Typed study configuration, validated once at the edge (CLI / Snakefile).

A YAML file maps onto `StudyConfig`; every unknown key, wrong type or out-of-range value
fails at load time with a message naming the key (e.g. `pretrain.batch_size`). The library
below this layer takes the resulting frozen dataclasses or plain values.
"""
from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dbp.presets import PRESETS

ENCODER_LAYERS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
PATCH_EMBED = r"patch_embed\.proj"
ARMS = ("bp", "dbp", "identity")
# Controls are not tuned and get no budget ladder: they take the winner of the arm they
# control (identity = BP's layers doing nothing, so its losses equal BP's exactly).
CONTROLS = {"identity": "bp"}
ROLES = ("target", "tuning", "scored", "sweep")
FLOAT_TEXT = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"  # numbers PyYAML leaves as text


class ConfigError(ValueError):
    """A configuration problem, with the dotted key (or file) it concerns."""


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["embedded", "imagenet"] = "embedded"
    root: str = "data/embedded"          # embedded: made here on demand; imagenet: train/ val/
    embedded_seed: int = 0               # generator seed of the embedded data
    fraction: float = 1.0                # subset of train images, sampled per run seed
    class_balanced: bool = False
    on_error: Literal["raise", "skip"] = "raise"  # corrupt images: stop, or skip and count
    image_size: int = 32                 # must equal the model preset's input size
    val_images: int | None = None        # a fixed sample spread over classes (None: all)
    num_workers: int = 2

    def validate(self, key: str) -> None:
        _require(0.0 < self.fraction <= 1.0, f"{key}.fraction", f"must be in (0, 1], got {self.fraction}")
        _require(self.image_size > 0, f"{key}.image_size", "must be positive")
        _require(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")
        _require(self.val_images is None or self.val_images > 0, f"{key}.val_images", "must be positive")
        if self.kind == "imagenet":
            for split in ("train", "val"):
                _require(Path(self.root, split).is_dir(), f"{key}.root",
                         f"ImageNet folder {Path(self.root, split)} does not exist")


@dataclass(frozen=True)
class PretrainConfig:
    model: str = "mae_vit_tiny_patch4_32"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    batch_size: int = 64                 # per device and micro-step
    accum_steps: int = 1
    steps: int = 300                     # optimizer steps
    blr: float = 1.6e-2                  # lr = blr * effective batch / 256
    warmup_steps: int = 30
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta2: float = 0.95
    clip_grad: float | None = None
    eval_every: int = 15                 # validation points every N steps (shared by all arms)
    checkpoint_every: int = 50
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA if supported
    compile: bool = False

    def validate(self, key: str) -> None:
        _require(self.model in PRESETS, f"{key}.model",
                 f"unknown model {self.model!r}; choose one of {sorted(PRESETS)}")
        _require(0.0 < self.mask_ratio < 1.0, f"{key}.mask_ratio", "must be in (0, 1)")
        for name in ("batch_size", "accum_steps", "steps", "eval_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _require(self.blr > 0, f"{key}.blr", "must be > 0")
        _require(0 <= self.warmup_steps < self.steps, f"{key}.warmup_steps", "must be in [0, steps)")
        _require(self.clip_grad is None or self.clip_grad > 0, f"{key}.clip_grad", "must be > 0 or null")


@dataclass(frozen=True)
class DBPConfig:
    include: tuple[str, ...] = (ENCODER_LAYERS,)
    patch_embed: bool = False            # also decorrelate the patch embedding
    fused: bool = True
    sample_frac: float = 0.1
    replacement: bool = False
    decor_lr: float = 1e-3
    kappa: float = 1e-3
    variant: Literal["standard", "normalized"] = "standard"
    variance_term: Literal["row", "column"] = "row"
    center: bool = False
    stabilize: Literal["none", "project"] = "none"
    every: int = 1                       # R update every k optimizer steps

    def validate(self, key: str) -> None:
        _require(0.0 < self.sample_frac <= 1.0, f"{key}.sample_frac", "must be in (0, 1]")
        _require(0.0 <= self.kappa <= 1.0, f"{key}.kappa", "must be in [0, 1]")
        _require(self.decor_lr >= 0.0, f"{key}.decor_lr", "must be >= 0")
        _require(self.every >= 1, f"{key}.every", "must be >= 1")
        _require(len(self.include) > 0, f"{key}.include", "needs at least one pattern")

    def patterns(self) -> list[str]:
        return [*self.include, *([PATCH_EMBED] if self.patch_embed else [])]

    def layer_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("fused", "sample_frac", "replacement", "decor_lr",
                                               "kappa", "variant", "variance_term", "center",
                                               "stabilize")}


@dataclass(frozen=True)
class EnergyConfig:
    enabled: bool = True
    country_iso_code: str = "NLD"
    measure_power_secs: float = 1.0     # codecarbon's power-sampling interval (its task-mode rate)
    fallback_watts: float = 18.0        # used only if codecarbon fails: its own CPU+RAM estimate here

    def validate(self, key: str) -> None:
        _require(len(self.country_iso_code) == 3, f"{key}.country_iso_code", "must be ISO-3166 alpha-3")
        _require(self.measure_power_secs > 0, f"{key}.measure_power_secs", "must be > 0")


@dataclass(frozen=True)
class FinetuneConfig:
    """Segmentation fine-tuning of each pre-trained encoder (UperNet through mmseg)."""
    enabled: bool = True
    preset: Literal["cpu_tiny", "paper"] = "cpu_tiny"  # dbp.segment.SEG_PRESETS
    kind: Literal["embedded", "ade20k"] = "embedded"
    root: str = "data/embedded"            # embedded: made on demand; ade20k: ADEChallengeData2016/
    embedded_seed: int = 0
    fraction: float = 1.0                  # of the training images; the paper: 0.10 of ADE20K
    iterations: int | None = None          # None: the preset's, scaled by `fraction`
    num_workers: int = 0
    seeds: int = 3                         # fine-tune the encoders of the first N scored seeds

    def validate(self, key: str) -> None:
        _require(0.0 < self.fraction <= 1.0, f"{key}.fraction",
                 f"must be in (0, 1], got {self.fraction}")
        _require(self.iterations is None or self.iterations >= 1, f"{key}.iterations",
                 "must be >= 1")
        _require(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")
        _require(self.seeds >= 1, f"{key}.seeds", "must be >= 1")
        if self.kind == "ade20k":
            _require(Path(self.root, "objectInfo150.txt").is_file(), f"{key}.root",
                     f"{self.root} is not an ADE20K folder (no objectInfo150.txt)")


def _grid_points(grid: dict[str, tuple[Any, ...]]) -> list[tuple[tuple[str, Any], ...]]:
    """Every point of a grid (dotted key -> values) as ((key, value), ...), in grid order."""
    keys = list(grid)
    return [tuple(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _check_grid(grid: dict[str, tuple[Any, ...]], key: str, sections: tuple[str, ...]) -> None:
    _require(bool(grid), f"{key}.grid", "needs at least one key")
    for k, values in grid.items():
        _require(k.split(".")[0] in sections and k.count(".") == 1, f"{key}.grid.{k}",
                 f"keys look like {' or '.join(s + '.<key>' for s in sections)}")
        _require(len(values) > 0, f"{key}.grid.{k}", "needs at least one value")


@dataclass(frozen=True)
class SeedsConfig:
    """Disjoint seed sets, one per run role (docs/protocol.md rules 1, 5, 8): the runs that
    set the target, tune the arms and are scored never share a seed."""
    scored: tuple[int, ...] = tuple(range(6))
    target: tuple[int, ...] = (100, 101, 102, 103, 104)
    tuning: tuple[int, ...] = (200,)

    def validate(self, key: str) -> None:
        for role in ("scored", "target", "tuning"):
            seeds = getattr(self, role)
            _require(all(s >= 0 for s in seeds), f"{key}.{role}", f"seeds must be >= 0, got {list(seeds)}")
            _require(len(set(seeds)) == len(seeds), f"{key}.{role}", f"repeated seeds in {list(seeds)}")
        _require(bool(self.scored), f"{key}.scored", "needs at least one seed")
        _require(bool(self.target), f"{key}.target", "needs at least one seed (the protocol asks for 5)")
        for a, b in itertools.combinations(("scored", "target", "tuning"), 2):
            shared = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            _require(not shared, f"{key}.{a}", f"shares seeds {shared} with {key}.{b}: "
                     "the roles need disjoint seeds")


@dataclass(frozen=True)
class TuningConfig:
    """The same declared grid for every tuned arm (rule 5), each trial a fully decayed run of
    the base budget on every tuning seed; the winner per arm feeds the target-setting and
    scored runs. `enabled: false` pins the config's values (the report says so)."""
    enabled: bool = True
    grid: dict[str, tuple[Any, ...]] = field(default_factory=lambda: {"pretrain.blr": (4e-3, 8e-3, 1.6e-2)})

    def validate(self, key: str) -> None:
        if self.enabled:
            _check_grid(self.grid, key, ("pretrain",))


@dataclass(frozen=True)
class BudgetsConfig:
    """Extra fully decayed runs at `scales` x pretrain.steps (warm-up scaled alike) for every
    non-control arm on the first `seeds` scored seeds: with the base runs, a budget curve
    per arm (rule 9)."""
    scales: tuple[float, ...] = (0.5, 1.5)
    seeds: int = 6

    def validate(self, key: str) -> None:
        _require(all(s > 0 and s != 1.0 for s in self.scales), f"{key}.scales",
                 f"must be > 0 and not 1 (the base budget is always run), got {list(self.scales)}")
        _require(len(set(self.scales)) == len(self.scales), f"{key}.scales", "repeated scales")
        _require(self.seeds >= 0, f"{key}.seeds", "must be >= 0")


@dataclass(frozen=True)
class StepCostConfig:
    """The side-by-side step-time measurement (dbp stepcost) that turns steps into
    wall-clock for the headline: `rounds` timed rounds, one turn per arm each, after
    `warmup` untimed ones."""
    rounds: int = 100
    warmup: int = 3

    def validate(self, key: str) -> None:
        _require(self.rounds >= 3, f"{key}.rounds", f"must be >= 3, got {self.rounds}")
        _require(self.warmup >= 0, f"{key}.warmup", f"must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class SweepConfig:
    """Exploratory pre-training runs (role "sweep", on the tuning seeds, never scored): the
    cartesian product of `grid` (e.g. dbp.decor_lr x dbp.kappa) for each arm in `arms`."""
    arms: tuple[str, ...] = ("dbp",)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        for a in self.arms:
            _require(a in ARMS, f"{key}.arms", f"unknown arm {a!r}; choose from {ARMS}")
        _check_grid(self.grid, key, ("pretrain", "dbp"))


@dataclass(frozen=True)
class Run:
    """One pre-training run family of the study: an arm with overrides (a tuning trial, a
    budget, a sweep point) on a set of seeds. `tuned`: reads the selected values."""
    run_id: str
    arm: str
    overrides: tuple[tuple[str, Any], ...]
    seeds: tuple[int, ...]
    tuned: bool = True
    sweep: str | None = None

    def set_args(self) -> list[str]:
        """The overrides as `dbp pretrain --set` values."""
        return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for k, v in self.overrides]


@dataclass(frozen=True)
class StudyConfig:
    name: str = "default"
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    arms: tuple[str, ...] = ARMS
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dbp: DBPConfig = field(default_factory=DBPConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    stepcost: StepCostConfig = field(default_factory=StepCostConfig)
    # per-arm pinned overrides of the pretrain section, e.g. {"dbp": {"blr": 8e-3}}
    arm_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweeps: dict[str, SweepConfig] = field(default_factory=dict)

    def validate(self, key: str = "") -> None:
        for a in (*self.arms, *self.arm_overrides):
            _require(a in ARMS, "arms", f"unknown arm {a!r}; choose from {ARMS}")
        _require("bp" in self.arms, "arms", "needs bp: the baseline sets the target")
        for sub in ("seeds", "data", "pretrain", "dbp", "energy", "finetune", "tuning", "budgets",
                    "stepcost"):
            getattr(self, sub).validate(sub)
        _require(not (self.tuning.enabled and not self.seeds.tuning), "seeds.tuning",
                 "needs at least one seed while tuning.enabled is true")
        _require(self.budgets.seeds <= len(self.seeds.scored), "budgets.seeds",
                 f"must be <= the {len(self.seeds.scored)} scored seeds")
        _require(self.finetune.seeds <= len(self.seeds.scored), "finetune.seeds",
                 f"must be <= the {len(self.seeds.scored)} scored seeds")
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
        for arm in self.arm_overrides:
            self.pretrain_for(arm)  # validates the merged section
        for name, sweep in self.sweeps.items():
            sweep.validate(f"sweeps.{name}")
            _require(bool(self.seeds.tuning), "seeds.tuning", "sweeps run on the tuning seeds: add one")
        for run in self.runs().values():  # every trial, budget and sweep point must make a valid config
            if run.overrides:
                self.with_overrides(run)

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
                add(Run(f"{arm}__steps={steps}", arm, point, budget_seeds), "budgets.scales")
        if self.tuning.enabled:
            for point in _grid_points(self.tuning.grid):
                for arm in self.tuned_arms():
                    add(Run(_run_id(arm, point), arm, point, s.tuning, tuned=False), "tuning.grid")
        for name, sweep in self.sweeps.items():
            for point in _grid_points(sweep.grid):
                for arm in sweep.arms:
                    add(Run(_run_id(arm, point), arm, point, s.tuning, sweep=name), f"sweeps.{name}")
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
        cfg = _build(PretrainConfig, {**dataclasses.asdict(self.pretrain), **over},
                     f"arm_overrides.{arm}")
        cfg.validate(f"arm_overrides.{arm}")
        return cfg

    def dbp_for(self, arm: str) -> DBPConfig | None:
        """DBP settings of an arm: none for BP, eta = 0 for the identity control."""
        if arm == "bp":
            return None
        return self.dbp if arm == "dbp" else dataclasses.replace(self.dbp, decor_lr=0.0)

    def run_config(self, arm: str) -> dict[str, Any]:
        """What one run of `arm` trains with: the sections that change its weights and
        clock (the seed sets, tuning grid and fine-tuning are not among them)."""
        dbp_cfg = self.dbp_for(arm)
        return {"name": self.name, "data": dataclasses.asdict(self.data),
                "pretrain": dataclasses.asdict(self.pretrain_for(arm)),
                "dbp": dataclasses.asdict(dbp_cfg) if dbp_cfg else None,
                "energy": dataclasses.asdict(self.energy)}


def _run_id(arm: str, point: tuple[tuple[str, Any], ...]) -> str:
    return "__".join([arm, *(f"{k.split('.')[1]}={_short(v)}" for k, v in point)])


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        _require(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return {k: _check_type(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        names = ", ".join(f.name for f in dataclasses.fields(tp))
        _require(isinstance(value, dict), key, f"must be a mapping with keys {names}, got {value!r}")
        return _build(tp, value, key)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            with suppress(ValueError):
                value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, key, f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key,
                 f"must be an integer, got {value!r}")
        return value
    _require(isinstance(value, tp), key, f"must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], key: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    unknown = sorted(set(data) - names)
    _require(not unknown, prefix + unknown[0] if unknown else key,
             f"unknown key (known: {', '.join(sorted(names))})")
    return cls(**{k: _check_type(v, hints[k], prefix + k) for k, v in data.items()})


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Read, merge overrides into, type-check and validate a study config."""
    raw: dict[str, Any] = {}
    if path is not None:
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
        _require(isinstance(raw, dict), str(p),
                 f"top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(_merge(raw, parse_overrides(overrides or [])))


def config_from_dict(raw: dict[str, Any]) -> StudyConfig:
    """Type-check and validate an already-merged mapping (e.g. Snakemake's `config`)."""
    cfg = _build(StudyConfig, raw, "")
    cfg.validate()
    return cfg


def json_schema(tp: Any = StudyConfig) -> dict[str, Any]:
    """The JSON schema of a config type, derived from the dataclasses (one source of truth);
    workflow/schemas/study.schema.yaml is this, checked in (a test keeps them equal)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return {"anyOf": [json_schema(inner[0]), {"type": "null"}]}
    if origin is tuple:
        return {"type": "array", "items": json_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_schema(args[1])}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return {"type": "object", "additionalProperties": False,
                "properties": {f.name: json_schema(hints[f.name]) for f in dataclasses.fields(tp)}}
    return {Any: {}, float: {"type": ["number", "string"], "pattern": FLOAT_TEXT},  # 1e-3: YAML text
            int: {"type": "integer"}, bool: {"type": "boolean"},
            str: {"type": "string"}}[tp]


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
