"""The trained model as an MLflow pyfunc (issue 14, item 3).

- logged to an existing run (which stays as it was), loaded back with mlflow.pyfunc, it draws
  the samples that ddgm and the sample stage draw for the same request and seed;
- registered as a new version when a name is given, not otherwise;
- nothing is pickled: the model folder has no pickle and loading it unpickles nothing;
- bad requests are errors that name the input;
- ``mlflow models serve --env-manager local`` serves the same samples over REST.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from support import free_port, kill_group, subprocess_env

from ddgm.config import ModelConfig, ScheduleConfig
from ddgm.models import build_model
from ddgm.quantization import unit_to_levels
from ddgm.samplers import sample
from ddgm.serialization import save_model
from ddgm.training.mlflow_model import log_ddgm_model, parse_request
from pipeline.params import SampleParams
from pipeline.sample import draw_samples

pytestmark = pytest.mark.usefixtures("single_thread")

REGISTERED = "ddgm-test"
EPSILON = ModelConfig(diffusion=ScheduleConfig("cosine", 20),
                      network="unet", base_channels=8, channel_mults=(1,), num_res_blocks=1, norm_groups=4,
                      dropout=0.0, variance="learned_range")
ARTICLE = ModelConfig(formulation="article", diffusion=ScheduleConfig("cosine", 5),
                      network="mlp", hidden_dim=16, depth=1, variance="fixed_large")


def _saved(config: ModelConfig, path: Path):
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_model(model, path)
    return model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh sqlite store with one RUNNING run (as the train stage leaves it), an epsilon U-Net
    and an article MLP saved as the train stage saves them; the U-Net logged and registered."""
    work = tmp_path_factory.mktemp("mlflow_model")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ddgm", artifact_location=(work / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    epsilon, article = _saved(EPSILON, work / "eps" / "model"), _saved(ARTICLE, work / "article" / "model")
    info = log_ddgm_model(run_id, uri, work / "eps" / "model", register_as=REGISTERED)
    return SimpleNamespace(work=work, uri=uri, client=client, run_id=run_id, info=info, epsilon=epsilon,
                           article=article)


@pytest.fixture
def tracking(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    return store


def test_loaded_model_draws_what_ddgm_draws(tracking):
    loaded = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/model")
    out = loaded.predict({"num_samples": 3, "sampler": "ddim", "num_steps": 5, "eta": 0.5, "seed": 7})
    assert isinstance(out, np.ndarray) and out.shape == (3, 1, 8, 8) and out.dtype == np.uint8
    assert out.max() <= 16 and out.min() >= 0 and len(np.unique(out)) > 2
    expected = sample(tracking.epsilon, 3, "ddim", 5, 0.5, torch.Generator().manual_seed(7)).images
    np.testing.assert_array_equal(out, unit_to_levels(expected, 17).numpy())
    ancestral = loaded.predict(pd.DataFrame([{"sampler": "ancestral", "num_samples": 2, "seed": 1}]))
    expected = sample(tracking.epsilon, 2, "ancestral", None, 0.0, torch.Generator().manual_seed(1)).images
    np.testing.assert_array_equal(ancestral, unit_to_levels(expected, 17).numpy())
    assert not np.array_equal(out, loaded.predict({"num_samples": 3, "num_steps": 5, "eta": 0.5, "seed": 8}))


def test_batched_request_matches_the_sample_stage(tracking):
    loaded = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/model")
    out = loaded.predict(pd.DataFrame([{"num_samples": 5, "num_steps": 4, "eta": 1.0, "batch_size": 2, "seed": 3}]))
    stage = SampleParams(num_samples=5, sampler="ancestral", num_steps=4, eta=1.0, batch_size=2, seed=3)
    np.testing.assert_array_equal(out, draw_samples(tracking.epsilon, stage)[0].numpy())
    defaults = loaded.predict({})
    assert defaults.shape == (16, 1, 8, 8)
    np.testing.assert_array_equal(defaults, loaded.predict({"num_samples": 16, "sampler": "ancestral", "seed": 0,
                                                            "num_steps": 20, "eta": 0.0}))


@pytest.mark.parametrize(("request_row", "named"), [
    ({"num_samples": 0}, "num_samples"),
    ({"sampler": "euler"}, "sampler"),
    ({"num_steps": 500}, "num_sample_steps"),
    ({"eta": -1.0}, "eta"),
    ({"seed": -1}, "seed"),
    ({"num_samples": 2.5}, "num_samples"),
    ({"sampler": 3}, "sampler"),
])
def test_bad_requests_name_the_input(tracking, request_row, named):
    loaded = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/model")
    with pytest.raises(MlflowException, match=named):
        loaded.predict(request_row)


def test_one_known_request_per_call(tracking):
    loaded = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/model")
    with pytest.raises(MlflowException, match="one row"):
        loaded.predict(pd.DataFrame([{"seed": 0}, {"seed": 1}]))
    with pytest.raises(MlflowException, match="steps"):  # MLflow drops unknown columns; a direct call names them
        parse_request({"steps": 5})


def test_registered_version_and_the_run_it_came_from(tracking):
    versions = tracking.client.search_model_versions(f"name='{REGISTERED}'")
    assert [int(v.version) for v in versions] == [1] and versions[0].run_id == tracking.run_id
    run = tracking.client.get_run(tracking.run_id)
    assert run.info.status == "RUNNING"  # the train stage still holds its run
    assert [m.model_id for m in run.outputs.model_outputs] == [tracking.info.model_id]  # the UI's Model column
    request = {"num_samples": 2, "num_steps": 3, "seed": 5}
    by_name = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1").predict(request)
    np.testing.assert_array_equal(by_name, mlflow.pyfunc.load_model(tracking.info.model_uri).predict(request))


def test_article_model_without_registration(tracking):
    before = tracking.client.search_registered_models()
    info = log_ddgm_model(tracking.run_id, tracking.uri, tracking.work / "article" / "model", name="article")
    assert tracking.client.search_registered_models() == before and info.registered_model_version is None
    loaded = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/article")
    expected = sample(tracking.article, 4, "ancestral", None, 0.0, torch.Generator().manual_seed(2)).images
    np.testing.assert_array_equal(loaded.predict({"num_samples": 4, "seed": 2}), unit_to_levels(expected, 17).numpy())
    with pytest.raises(MlflowException, match="epsilon formulation"):
        loaded.predict({"sampler": "ddim"})


def test_nothing_is_pickled(tracking, monkeypatch):
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{tracking.run_id}/model",
                                                       dst_path=str(tracking.work / "download")))
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"artifacts/model.safetensors", "artifacts/model.json", "mlflow_model_code.py"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pt", ".pth", ".pyc"))]
    flavor = mlflow.models.Model.load(str(folder)).flavors["python_function"]
    assert "python_model" not in flavor and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (cloudpickle, "load"),
                         (cloudpickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    out = mlflow.pyfunc.load_model(str(folder)).predict({"num_samples": 1, "num_steps": 2})
    assert out.shape == (1, 1, 8, 8)


def test_missing_model_files_are_named(tracking):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        log_ddgm_model(tracking.run_id, tracking.uri, tracking.work / "nothing")


def _post(url: str, body: dict) -> np.ndarray:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return np.array(json.loads(response.read())["predictions"])


def _wait_until_up(base: str, server: subprocess.Popen, log: Path, deadline_s: float = 90.0) -> None:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer /ping in {deadline_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_served_model_answers_over_rest(tracking):
    port, log = free_port(), tracking.work / "serve.log"
    env = subprocess_env(MLFLOW_TRACKING_URI=tracking.uri)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{tracking.run_id}/model",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log.open("w") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(base, server, log)
        request = {"num_samples": 3, "num_steps": 4, "seed": 11}
        expected = mlflow.pyfunc.load_model(f"runs:/{tracking.run_id}/model").predict(request)
        records = _post(f"{base}/invocations", {"dataframe_records": [request]})
        np.testing.assert_array_equal(records, expected)
        np.testing.assert_array_equal(_post(f"{base}/invocations", {"inputs": request}), expected)
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(f"{base}/invocations", {"inputs": {"num_samples": 0}})
        assert refused.value.code == 400
    finally:
        kill_group(server)
