"""benchmarks/sample_quality.py: Frechet distance per sampler step count as mean +- std over seeds and
over one large draw, beside the train-vs-test floor, written to JSON."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import torch
from support import ROOT, subprocess_env

from ddgm.config import ModelConfig, ModelSpec, ScheduleConfig
from ddgm.models import build_model
from ddgm.serialization import save_model

SCRIPT = ROOT / "benchmarks" / "sample_quality.py"


def test_report_has_spread_over_seeds_and_the_floor(digits_shards, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig.build(ModelSpec(base_channels=8, channel_mults=(1,), num_res_blocks=1, norm_groups=4),
                               ScheduleConfig("cosine", 10), (1, 8, 8), 17)
    save_model(build_model(config), tmp_path / "model")
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tmp_path / "model"), "--shards", str(digits_shards),
         "--steps", "2,5", "--seeds", "3", "--samples", "60", "--large", "120", "--classifier-epochs", "1",
         "--out", str(out)],
        capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["floor_train_vs_test"] > 0
    assert set(report["steps"]) == {"2", "5"}
    for row in report["steps"].values():
        assert len(row["draws"]) == 3 and len(set(row["draws"])) == 3  # each seed its own draw
        assert row["mean"] == statistics.fmean(row["draws"])
        assert row["std"] == statistics.stdev(row["draws"]) > 0
        assert row["large"] > 0 and row["ratio_to_floor"] == row["mean"] / report["floor_train_vs_test"]
    assert "floor (train 1000 vs test 447)" in done.stdout
    assert report["sampler"] == "ancestral"
