"""The install recipe: one pinned requirements file, the same pins in environment.yml and the
jobs' conda env, inside pyproject's ranges, and every imported package declared."""
import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _lines(items) -> list[str]:
    return [s.strip() for s in items if s.strip() and not s.strip().startswith("#")]


def _pip_section(path: Path) -> list[str]:
    deps = yaml.safe_load(path.read_text())["dependencies"]
    return _lines(next(d["pip"] for d in deps if isinstance(d, dict)))


REQUIREMENTS = _lines((REPO / "requirements.txt").read_text().splitlines())
PINS = {Requirement(r).name.lower(): Requirement(r) for r in REQUIREMENTS if not r.startswith("-")}


def _declared() -> dict[str, Requirement]:
    text = (REPO / "pyproject.toml").read_text()
    block = text[text.index("dependencies = ["):text.index("]", text.index("dependencies = ["))]
    reqs = [Requirement(m) for m in re.findall(r'"([^"]+)"', block)]
    return {r.name.lower(): r for r in reqs}


def test_environment_yml_installs_exactly_the_requirements():
    assert _pip_section(REPO / "environment.yml") == REQUIREMENTS


def test_the_jobs_conda_env_has_the_same_pins_without_the_tools():
    tools = ("snakemake", "pytest", "-e")
    assert _pip_section(REPO / "workflow" / "envs" / "dbp.yaml") == [
        r for r in REQUIREMENTS if not r.startswith(tools)]


def test_every_pin_is_exact_and_inside_pyprojects_range():
    declared = _declared()
    for name, pin in PINS.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{name} is not pinned"
        if name in declared:
            assert declared[name].specifier.contains(spec.version), (name, spec.version, declared[name])
    assert declared["codecarbon"].specifier.contains("3.3.2") and not declared["codecarbon"].specifier.contains("3.3.0")
    assert set(declared) <= set(PINS)  # every declared dependency has a tested pin


def test_every_imported_third_party_package_is_declared():
    dists = md.packages_distributions()
    declared = set(_declared())
    missing = set()
    for path in [*(REPO / "dbp").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for top in {n.split(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top == "dbp":
                    continue
                owners = {d.lower() for d in dists.get(top, [top])}
                if not owners & declared:
                    missing.add(f"{top} ({path.relative_to(REPO)})")
    assert not missing, sorted(missing)
