"""The `dbp` command line: parse arguments, load and validate the config, call the library.

    dbp data make --root data/embedded            # the embedded default data (cached)
    dbp data subset --config C --seed S --out F   # a seeded train-subset manifest
    dbp pretrain --config C --arm dbp --seed 0 --out results/x/pretrain/dbp/seed0
    dbp config --config C                         # validate and print the resolved config
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dbp.config import ARMS, ConfigError, load_config, to_dict


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="study YAML (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set pretrain.steps=50 (repeatable)")


def _cmd_config(args) -> None:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def _cmd_data_make(args) -> None:
    from dbp.embedded import make_embedded
    root = make_embedded(args.root, seed=args.seed, progress=True)
    print(root)


def _cmd_data_subset(args) -> None:
    from dbp.data import imagenet_root, train_manifest
    from dbp.subset import manifest_hash, write_manifest
    d = load_config(args.config, args.overrides).data
    paths = train_manifest(imagenet_root(d.kind, d.root, d.embedded_seed), d.fraction, args.seed,
                           d.class_balanced)
    write_manifest(args.out, paths)
    print(f"{args.out}: {len(paths)} images, sha256 {manifest_hash(paths)[:12]}")


def _cmd_pretrain(args) -> None:
    import dbp._compat  # noqa: F401  (before timm)
    from dbp.measure import set_quiet_env
    from dbp.pretrain import pretrain
    set_quiet_env()
    cfg = load_config(args.config, args.overrides)
    if args.arm not in cfg.arms:
        raise ConfigError(f"--arm {args.arm}: not among the config's arms {list(cfg.arms)}")
    info = pretrain(args.out, arm=args.arm, seed=args.seed, data_cfg=cfg.data,
                    cfg=cfg.pretrain_for(args.arm), dbp_cfg=cfg.dbp_for(args.arm),
                    probe_patterns=cfg.dbp.patterns(), probe_kappa=cfg.dbp.kappa,
                    energy_cfg=cfg.energy, resolved_config=to_dict(cfg), manifest=args.manifest)
    if info["status"] == "diverged":
        print(f"diverged at step {info.get('diverged_at_step')}; evidence in {args.out}",
              file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dbp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="validate a config and print it resolved")
    _config_args(p)
    p.set_defaults(func=_cmd_config)

    data = sub.add_parser("data", help="make the embedded data, sample subset manifests")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("make", help="write the embedded default data set (cached by seed)")
    p.add_argument("--root", type=Path, default=Path("data/embedded"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data_make)
    p = dsub.add_parser("subset", help="sample a seeded train-subset manifest")
    _config_args(p)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_data_subset)

    p = sub.add_parser("pretrain", help="MAE pre-training of one arm for one seed")
    _config_args(p)
    p.add_argument("--arm", choices=ARMS, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--manifest", type=Path, help="train-subset manifest (default: sample by seed)")
    p.set_defaults(func=_cmd_pretrain)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        sys.exit(f"dbp {args.command}: config error: {e}")
