"""Apply a preset to a params file: set the keys the preset changes, keep every other key and comment.

Usage: python -m pipeline.presets presets/article.yaml [--params params.yaml]
A preset (presets/*.yaml) holds only the keys it changes from params.yaml's defaults. The result
is checked by the same loader as every stage (pipeline/params.py) before the params file is
rewritten, so a bad preset leaves it as it was. Then ``dvc exp run`` (or ``dvc repro``) runs the
stages whose params changed; ``git checkout params.yaml`` goes back to the defaults.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from ddgm.atomic import atomic_write
from pipeline.errors import run_reporting_input_errors
from pipeline.params import load_params
from pipeline.params_file import read_params_file

NULL_TAG = "tag:yaml.org,2002:null"


def flow_list(values: list[Any]) -> CommentedSeq:
    """A YAML list written on one line ([1, 2]), as params.yaml writes its lists."""
    seq = CommentedSeq(values)
    seq.fa.set_flow_style()
    return seq


def preset_text(params_text: str, preset: dict[str, Any]) -> str:
    """The params file ``params_text`` with the keys of ``preset`` set, comments and order kept."""
    yaml = YAML()  # round trip: comments, order and the layout of untouched keys stay
    yaml.width = 120
    yaml.representer.add_representer(type(None), lambda dumper, _: dumper.represent_scalar(NULL_TAG, "null"))
    document = yaml.load(params_text)
    for section, changes in preset.items():
        for key, value in changes.items():
            document[section][key] = flow_list(value) if isinstance(value, list) else value
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", help="a preset file, e.g. presets/article.yaml")
    parser.add_argument("--params", default="params.yaml", help="the params file to change (params.yaml)")
    args = parser.parse_args(argv)
    load_params(args.params, args.preset)  # every key known, every value valid
    preset = read_params_file(args.preset)
    text = preset_text(Path(args.params).read_text(), preset)
    atomic_write(args.params, lambda tmp: Path(tmp).write_text(text))
    changed = sum(len(changes) for changes in preset.values())
    print(f"{args.params}: {changed} key(s) set from {args.preset}")


if __name__ == "__main__":
    sys.exit(run_reporting_input_errors(main))
