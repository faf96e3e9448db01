"""Every run names its data: the dataset input logged to MLflow (name, digest = manifest hash, source = raw
location, splits and counts), distinct for runs on different data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ddgm.data import DataParams, manifest_hash, prepare_dataset, read_manifest
from ddgm.data.lineage import dataset_input
from ddgm.training.tracking import MlflowTracker


def _folder(root, values) -> str:
    for i, value in enumerate(values):
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(root / f"{i}.png")
    return str(root)


def _logged_inputs(uri: str, run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).inputs.dataset_inputs


@pytest.mark.slow
def test_runs_on_different_data_log_different_dataset_inputs(tmp_path, mlflow_store):
    uri = mlflow_store(tmp_path / "mlflow.db")
    images = _folder(tmp_path / "images", [0, 50, 100, 150, 200])
    logged = []
    for version in ("v1", "v2"):
        if version == "v2":
            _folder(tmp_path / "images", [0, 50, 100, 150, 201])  # one pixel value of one image changed
        out = tmp_path / version
        prepare_dataset(DataParams(source="folder", path=images, val_fraction=0.2, test_fraction=0.2), out)
        tracker = MlflowTracker(uri, "lineage", run_name=version)
        tracker.log_dataset(**dataset_input(read_manifest(out), manifest_hash(out), str(out)))
        tracker.close()
        (item,) = _logged_inputs(uri, tracker.run_id)
        logged.append((item, manifest_hash(out), read_manifest(out)))
    for item, digest, manifest in logged:
        dataset, profile = item.dataset, json.loads(item.dataset.profile)
        assert dataset.name == "images" and dataset.digest == digest[:36]
        assert json.loads(dataset.source) == {"uri": images} and dataset.source_type == "local"
        assert profile["splits"] == {"train": 3, "val": 1, "test": 1} and profile["num_rows"] == 5
        assert profile["manifest_sha256"] == digest and profile["raw_sha256"] == manifest.raw_inputs.sha256
        assert profile["files_read"] == 5 and profile["files_skipped"] == 0
        assert {(t.key, t.value) for t in item.tags} == {("mlflow.data.context", "training")}
    assert logged[0][0].dataset.digest != logged[1][0].dataset.digest


def test_digits_dataset_input_names_its_source(digits_shards):
    record = dataset_input(read_manifest(digits_shards), manifest_hash(digits_shards), str(digits_shards))
    assert (record["name"], record["source"], record["source_type"]) == ("digits", "sklearn digits", "code")
    assert record["profile"]["splits"] == {"train": 1000, "val": 350, "test": 447}
    assert record["profile"]["image_shape"] == [1, 8, 8] and record["profile"]["num_levels"] == 17
