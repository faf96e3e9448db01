"""Remote storage against a real S3 API: a moto S3 server on 127.0.0.1 (started and stopped by a fixture),
reached through the same clients a real bucket uses (dvc-s3, s3fs via fsspec, boto3).

- `dvc push` of the pipeline's prepared shards to an s3:// DVC remote, then `git clone` + `dvc pull`
  elsewhere gives the same bytes and a clean `dvc status`;
- training that streams its shards from an s3:// location (DDGM_SHARDS) ends with the same weights as
  training from the local copy, and its MLflow run names the same dataset;
- a shard changed on the bucket after it was prepared stops training with the shard's name.

The commands are those of infra/README.md, "S3 remote".
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import DVC_GIT_ENV, scaled, subprocess_env
from test_lineage import pipeline_project

from ddgm.data import manifest_hash

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TINY = {
    "diffusion": {"num_steps": 10},
    "model": {"network": "mlp", "hidden_dim": 32, "depth": 1},
    # mixed_precision: one per process (Accelerate's state), the launcher's as in the suite's other in-process runs
    "train": {"mixed_precision": None, "max_steps": 12, "warmup_steps": 2, "batch_size": 32, "val_every": 12,
              "val_batch_size": 350, "val_chunk": 10, "checkpoint_every": 12, "log_every": 4},
}


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str | None]  # what a client process needs to reach it (and nothing of the caller's AWS setup)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"ddgm-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server bound to 127.0.0.1 on a free port, stopped however the tests end; the process
    environment points the AWS clients at it for the module's tests."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    request_log = logging.getLogger("werkzeug")
    level = request_log.level
    request_log.setLevel(logging.WARNING)  # not one line per request
    server.start()
    try:
        host, port = server.get_host_and_port()
        aws = tmp_path_factory.mktemp("aws")  # no profile or credentials of the caller's
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": str(aws / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
               "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
               "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None, "AWS_CA_BUNDLE": None}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.delenv(name, raising=False) if value is None else patch.setenv(name, value)
            yield S3Server(f"http://{host}:{port}", env)
    finally:
        server.stop()
        request_log.setLevel(level)


def _run(cmd: list[str], cwd: Path, env: dict[str, str | None], timeout: float = 120, check: bool = True):
    full_env = subprocess_env(unset=("PYTHONPATH", "DDGM_SHARDS", "MLFLOW_TRACKING_URI"), **DVC_GIT_ENV, **env)
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _dvc(cwd: Path, s3: S3Server, *args: str):
    return _run([sys.executable, "-m", "dvc", *args], cwd, s3.env)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_dvc_push_and_pull_through_an_s3_remote(s3, tmp_path):
    project = pipeline_project(tmp_path / "project", {})
    _dvc(project, s3, "repro", "prepare")
    bucket = s3.new_bucket()
    _dvc(project, s3, "remote", "add", "-d", "storage", f"s3://{bucket}/dvc")
    _dvc(project, s3, "remote", "modify", "storage", "endpointurl", s3.endpoint)
    _run(["git", "add", "-A"], project, s3.env)
    _run(["git", "commit", "-q", "-m", "prepared"], project, s3.env)
    pushed = _dvc(project, s3, "push").stdout
    shards = _files(project / "data" / "shards")
    assert len(s3.keys(bucket, "dvc/files/md5/")) == len(shards) + 1, pushed  # every file and the directory listing

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path, s3.env)
    assert not (clone / "data" / "shards").exists()
    _dvc(clone, s3, "pull", "prepare")
    assert _files(clone / "data" / "shards") == shards
    status = _dvc(clone, s3, "status", "prepare").stdout
    assert "changed" not in status and "up to date" in status, status


def _upload(s3: S3Server, bucket: str, prefix: str, directory: Path) -> str:
    """The shard directory copied to s3://bucket/prefix as infra/README.md does it (fsspec, s3fs)."""
    import fsspec

    location = f"s3://{bucket}/{prefix}"
    fsspec.filesystem("s3", skip_instance_cache=True).put(f"{directory}/", f"{location}/", recursive=True)
    assert s3.keys(bucket, prefix) == [f"{prefix}/{p.name}" for p in sorted(directory.iterdir())]
    return location


def _train(work: Path, shards: Path, location: str | None, tracking_uri: str | None, monkeypatch,
           max_steps: int = 12) -> int:
    """pipeline.train's entry point, in this process (whose environment reaches the S3 server), on the tiny
    params in ``work``, reading the shards from ``location`` (DDGM_SHARDS) when given; no tracking without
    ``tracking_uri``. Its exit status."""
    from pipeline.stage import run_stage
    from pipeline.train import main

    values = scaled(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    values["train"]["max_steps"] = max_steps
    values["data"]["out_dir"] = str(shards)
    values["tracking"].update(uri=tracking_uri, enabled=tracking_uri is not None)
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    with monkeypatch.context() as patch:
        patch.chdir(work)
        for name in ("DDGM_CHECKPOINT_DIR", "MLFLOW_TRACKING_URI", "DDGM_TRACEBACK"):
            patch.delenv(name, raising=False)
        patch.delenv("DDGM_SHARDS", raising=False)
        if location:
            patch.setenv("DDGM_SHARDS", location)
        return run_stage(main, ["--params", "params.yaml"])


def _dataset_inputs(work: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddgm").experiment_id])
    return run.inputs.dataset_inputs


def test_training_streams_shards_from_s3_to_the_same_weights(s3, digits_shards, tmp_path, mlflow_store, monkeypatch,
                                                             restore_signals, single_thread):
    from safetensors.torch import load_file

    location = _upload(s3, s3.new_bucket(), "ddgm/shards", digits_shards)
    for name, shards_location in (("local", None), ("remote", location)):
        status = _train(tmp_path / name, digits_shards, shards_location, mlflow_store(tmp_path / name / "mlflow.db"),
                        monkeypatch)
        assert status == 0, name
    local = load_file(tmp_path / "local" / "models" / "model.safetensors")
    remote = load_file(tmp_path / "remote" / "models" / "model.safetensors")
    assert local.keys() == remote.keys()
    assert all(local[k].equal(remote[k]) for k in local)
    (local_input,), (remote_input,) = _dataset_inputs(tmp_path / "local"), _dataset_inputs(tmp_path / "remote")
    assert local_input.dataset.digest == remote_input.dataset.digest == manifest_hash(digits_shards)[:36]
    assert json.loads(remote_input.dataset.profile)["shards"] == location


def test_shard_changed_on_the_bucket_stops_training_with_its_name(s3, digits_shards, tmp_path, monkeypatch, capsys,
                                                                  restore_signals, single_thread):
    bucket = s3.new_bucket()
    location = _upload(s3, bucket, "shards", digits_shards)
    name = "train-000001.tar"
    data = (digits_shards / name).read_bytes()
    s3.client().put_object(Bucket=bucket, Key=f"shards/{name}", Body=data[: len(data) // 2])
    # 40 steps of 32: more than one epoch, so every shard is read
    capsys.readouterr()
    status = _train(tmp_path / "work", digits_shards, location, None, monkeypatch, max_steps=40)
    stderr = capsys.readouterr().err
    assert status == 1 and name in stderr, stderr[-3000:]
    assert not (tmp_path / "work" / "models" / "model.safetensors").exists()
