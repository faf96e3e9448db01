"""DVC stage ``prepare``: build train/val/test shards and manifest.json from params.yaml's ``data:``.

Usage: python -m pipeline.prepare [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys

from ddgm.data.params import DataParams
from ddgm.data.prepare import prepare_dataset
from pipeline.errors import run_reporting_input_errors
from pipeline.params_file import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="YAML file with a 'data:' section")
    args = parser.parse_args(argv)
    params = load_section(args.params, "data", DataParams)
    manifest = prepare_dataset(params)
    counts = " ".join(f"{split}={n}" for split, n in manifest.splits.items())
    num_shards = sum(len(s) for s in manifest.shards.values())
    c, h, w = manifest.image_shape
    print(
        f"prepared {params.source}: {counts} ({num_shards} shards), images {c}x{h}x{w}, "
        f"K={manifest.num_levels}, skipped {len(manifest.skipped)} bad file(s) -> {params.out_dir}"
    )


if __name__ == "__main__":
    sys.exit(run_reporting_input_errors(main))
