"""The params schema (pipeline/params.py) and the files that must agree with it: params.yaml holds exactly
its defaults, every preset changes only keys of it (and validates), ``python -m pipeline.presets``
applies a preset without losing params.yaml's comments, and the README's parameter table gives
every key with its default. Bad values and keys fail naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.params import PipelineParams, apply_preset, load_params, params_from_dict
from pipeline.presets import main as apply_main

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def schema_defaults() -> dict:
    """{section: {key: default}} of the schema, lists for tuples."""
    return OmegaConf.to_container(OmegaConf.structured(PipelineParams))


def params_yaml() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_holds_exactly_the_schema_defaults() -> None:
    defaults, values = schema_defaults(), params_yaml()
    assert list(values) == list(defaults)
    for section, entries in defaults.items():
        assert list(values[section]) == list(entries), f"{section}: keys or their order differ"
        different = {key: (values[section][key], default) for key, default in entries.items()
                     if values[section][key] != default or type(values[section][key]) is not type(default)}
        assert not different, f"{section}: params.yaml vs schema default {different}"
    assert load_params(ROOT / "params.yaml") == PipelineParams()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_changes_only_schema_keys_and_validates(preset: Path) -> None:
    values, defaults = yaml.safe_load(preset.read_text()), schema_defaults()
    for section, entries in values.items():
        assert section in defaults, f"{preset.name}: unknown section {section}"
        for key, value in entries.items():
            assert key in defaults[section], f"{preset.name}: unknown key {section}.{key}"
            assert value != defaults[section][key], f"{preset.name}: {section}.{key} repeats the default {value!r}"
    assert load_params(ROOT / "params.yaml", preset) != PipelineParams()


def test_applying_a_preset_sets_its_keys_and_keeps_the_rest_and_the_comments(tmp_path: Path, capsys) -> None:
    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    comments = [line.split("#", 1)[1] for line in target.read_text().splitlines() if "#" in line]
    preset = ROOT / "presets" / "article.yaml"
    apply_main([str(preset), "--params", str(target)])
    assert "20 key(s) set" in capsys.readouterr().out
    assert yaml.safe_load(target.read_text()) == apply_preset(params_yaml(), yaml.safe_load(preset.read_text()))
    assert [line.split("#", 1)[1] for line in target.read_text().splitlines() if "#" in line] == comments
    assert load_params(target).model.formulation == "article"
    before = target.read_text()
    apply_main([str(preset), "--params", str(target)])  # idempotent
    assert target.read_text() == before


def test_a_bad_preset_leaves_the_params_file_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    for text, match in [("model: {widht: 3}\n", "unknown params key model.widht"),
                        ("train: {lr: fast}\n", "params key train.lr: Value 'fast'"),
                        ("train: {objective: simple, timestep_sampler: importance}\n",
                         "train.timestep_sampler 'importance'")]:
        (tmp_path / "preset.yaml").write_text(text)
        with pytest.raises(ValueError, match=match):
            apply_main([str(tmp_path / "preset.yaml"), "--params", str(target)])
        assert target.read_text() == (ROOT / "params.yaml").read_text()


@pytest.mark.parametrize(("values", "match"), [
    ({"train": {"learning_rate": 0.1}}, "unknown params key train.learning_rate"),
    ({"trian": {"lr": 0.1}}, "unknown params key trian"),
    ({"train": {"max_steps": "many"}}, "params key train.max_steps: Value 'many'"),
    ({"train": {"resume": None}}, "params key train.resume"),
    ({"train": 3}, "params section train must be a mapping"),
    ({"model": {"channel_mults": 2}}, "params key model.channel_mults"),
    ({"data": {"out_dir": ""}}, "data.out_dir must be a non-empty path"),
    ({"sample": {"sampler": "euler"}}, "sample.sampler must be one of"),
    ({"train": {"uniform_mix": 0.0}}, r"train.uniform_mix must lie in \(0, 1\]"),
    ({"train": {"uniform_mix": 1.5}}, r"train.uniform_mix must lie in \(0, 1\]"),
    ({"evaluate": {"comparison_steps": [0]}}, "evaluate.comparison_steps must all be >= 1"),
    ({"tracking": {"experiment": ""}}, "tracking.experiment must name"),
    ({"diffusion": {"schedule": "constant", "offset": None, "max_beta": None}}, "diffusion.beta must be set"),
    ({"diffusion": {"schedule": "constant", "offset": None, "beta": 0.1}}, "diffusion.max_beta is not used"),
    ({"diffusion": {"schedule": "linear"}}, "diffusion.offset is not used by schedule 'linear'"),
    ({"train": {"objective": "simple", "timestep_sampler": "uniform"}, "model": {"formulation": "article",
                                                                                 "network": "mlp"}},
     "train.objective 'simple' needs model.formulation 'epsilon'"),
])
def test_bad_params_name_the_key(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        params_from_dict(values)


def test_null_sections_take_the_defaults_and_values_are_typed() -> None:
    params = params_from_dict({"tracking": None, "train": {"lr": "1e-3"}, "model": {"channel_mults": [1, 2, 2]}})
    assert params.tracking == PipelineParams().tracking
    assert params.train.lr == 1e-3 and params.model.channel_mults == (1, 2, 2)


# --------------------------------------------------------------------------- README


def readme_table() -> list[tuple[list[str], list[str]]]:
    """(keys, defaults) of each row of the README's parameter reference table; a row's keys after
    the first may leave out the section (`train.optimizer`, `lr`)."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Parameter reference (`params.yaml`)", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        match = re.match(r"^\| (`[^|]+`) \| ([^|]+) \| .* \|$", line)
        if match is None:
            continue
        names = re.findall(r"`([^`]+)`", match.group(1))
        section = names[0].split(".")[0]
        keys = [name if "." in name else f"{section}.{name}" for name in names]
        rows.append((keys, split_top_level(match.group(2))))
    return rows


def split_top_level(cell: str) -> list[str]:
    """'`adamw`, 0.002, [10, 25], 0' -> ['`adamw`', '0.002', '[10, 25]', '0']."""
    parts, depth, current = [], 0, ""
    for char in cell.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def test_readme_parameter_table_gives_every_key_with_its_default() -> None:
    defaults = {f"{section}.{key}": value for section, entries in schema_defaults().items()
                for key, value in entries.items()}
    listed = {}
    for keys, cells in readme_table():
        assert len(cells) in (1, len(keys)), f"{keys}: {len(cells)} defaults for {len(keys)} keys"
        for key, cell in zip(keys, cells * len(keys) if len(cells) == 1 else cells, strict=True):
            assert key in defaults, f"README lists {key}, which is not a params key"
            assert key not in listed, f"README lists {key} twice"
            listed[key] = yaml.safe_load(cell.strip("`"))
    assert sorted(set(defaults) - set(listed)) == [], "params keys missing from the README's table"
    wrong = {key: (value, defaults[key]) for key, value in listed.items() if value != defaults[key]}
    assert not wrong, f"README default vs schema default: {wrong}"
