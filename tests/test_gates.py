"""The CI gates: .ci/run runs the README's test command, which runs the linters before the tests, and
CI installs exact versions of everything it needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
GATES = ("ruff check", "mypy", "lint-imports", "python -m pytest")
INSTALLED_FIRST = {"torch"}  # the README and .ci/run install torch on its own, before the constraints


def ci_command() -> str:
    """The last command line of .ci/run: the one that installs the project and runs the gates."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")][-1]


def test_ci_runs_the_readme_test_command_and_every_gate_in_order() -> None:
    command = ci_command()
    readme_lines = {line.strip() for line in (ROOT / "README.md").read_text().splitlines()}
    assert command in readme_lines, f".ci/run's command is not the README's test command:\n{command}"
    steps = [step.strip() for step in command.split("&&")]
    gate_steps = [next(i for i, step in enumerate(steps) if step.startswith(gate)) for gate in GATES]
    assert gate_steps == sorted(gate_steps), f"gates out of order in {steps}"
    assert steps[gate_steps[0] - 1].startswith("pip install") and "-c constraints.txt" in steps[gate_steps[0] - 1]


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_declared_dependency_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = _pins((ROOT / "constraints.txt").read_text())
    problems = []
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name in INSTALLED_FIRST:
            continue
        if name not in pins:
            problems.append(f"{requirement.name} is not pinned")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement.name}=={pins[name]} is outside {requirement.specifier}")
    assert not problems, "constraints.txt: " + "; ".join(problems)


def test_pins_reject_ranges() -> None:
    assert _pins("a==1.0  # why\n\n# comment\nB_c==2\n") == {"a": "1.0", "b-c": "2"}
    with pytest.raises(AssertionError, match=re.escape("'a>=1' is not an exact pin")):
        _pins("a>=1\n")
