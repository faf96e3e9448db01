"""Training on several processes (CPU, gloo) through the real launchers.

* ``accelerate launch`` with infra/accelerate/cpu_2proc.yaml: both ranks train and end with
  bit-identical weights and EMA weights; a 1-process checkpoint resumes on 2 processes;
* one SGD step on 2 ranks x b images equals one step on 1 rank x 2b images (DDP averages the
  gradients of a mean loss);
* two simulated machines (two launchers with multi_node_static.yaml, one rank each) on one host.

Each rank runs a small script that calls ddgm.training.loop.train and then saves its own copy of
the online and EMA weights (the library writes them from rank 0 only).
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import free_port, kill_group, rank_reports, repo_pythonpath, subprocess_env

from ddgm.training.loop import train
from pipeline.params import params_from_dict

ROOT = Path(__file__).resolve().parents[1]
ACC = ROOT / "infra" / "accelerate"

pytestmark = pytest.mark.slow

# Records the Accelerator and EMA that train() makes, then saves this rank's weights.
RANK_TRAIN = textwrap.dedent(
    """
    import sys
    from safetensors.torch import save_file
    import ddgm.training.launch as launch
    import ddgm.training.loop as loop
    import ddgm.training.step as step
    from pipeline.params import load_params

    accelerators, prepared, emas = [], [], []

    class RecordingAccelerator(launch.Accelerator):
        def prepare(self, *args, **kwargs):
            accelerators.append(self)
            out = super().prepare(*args, **kwargs)
            prepared.append(out)
            return out

    class RecordingEMA(step.EMA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            emas.append(self)

    launch.Accelerator, step.EMA = RecordingAccelerator, RecordingEMA
    params = load_params(sys.argv[1])
    result = loop.train(params.model, params.diffusion, params.train, params.data.out_dir)
    acc, objective, ema = accelerators[0], prepared[0][0], emas[0]
    rank = acc.process_index

    def cpu(module):
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    save_file(cpu(acc.unwrap_model(objective).model), f"rank{rank}-model.safetensors")
    save_file(cpu(ema.ema_model), f"rank{rank}-ema.safetensors")
    print(f"RANK {rank} WORLD {acc.num_processes} TYPE {acc.distributed_type.value} "
          f"BACKEND {acc.state.backend} STEP {result.step}", flush=True)
    """
)

# One SGD step of a mean loss: 2 ranks x b (DDP) vs 1 process x 2b, with the same x, t and noise.
GRAD_STEP = textwrap.dedent(
    """
    import copy
    import torch
    from torch import nn
    from accelerate import Accelerator
    from ddgm.config import ModelConfig, ScheduleConfig
    from ddgm.models import build_model
    from ddgm.quantization import levels_to_unit

    class MeanLoss(nn.Module):
        # what the training loop minimises: the mean over the batch of L_T + T L_{t-1}
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, t, noise):
            z_t = self.model.diffusion.q_sample(x, t, noise)
            terms = self.model.loss_terms(x, z_t, t)
            return (self.model.diffusion.prior_kl(x) + self.model.num_steps * terms).mean()

    def sgd_step(module, x, t, noise):
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
        loss = module(x, t, noise)
        loss.backward()
        optimizer.step()
        return loss.detach()

    acc = Accelerator()
    rank, world = acc.process_index, acc.num_processes
    config = ModelConfig(
        formulation="epsilon", image_shape=(1, 8, 8), num_levels=17, variance="learned_range",
        diffusion=ScheduleConfig("cosine", 10),
        network="unet", base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
        dropout=0.0)
    torch.manual_seed(0)
    model = build_model(config)
    start = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(1)
    batch = 16
    x = levels_to_unit(torch.randint(0, 17, (batch, 1, 8, 8), generator=g), 17)
    t = torch.randint(1, 11, (batch,), generator=g)
    noise = torch.randn(x.shape, generator=g)

    wrapper = MeanLoss(model)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=1e-3)
    wrapper, optimizer = acc.prepare(wrapper, optimizer)
    part = slice(rank * batch // world, (rank + 1) * batch // world)
    loss = wrapper(x[part], t[part], noise[part])
    acc.backward(loss)
    optimizer.step()
    mean_loss = acc.reduce(loss.detach(), "mean").item()
    distributed = {k: v.detach().clone() for k, v in acc.unwrap_model(wrapper).model.state_dict().items()}

    if rank == 0:
        reference = build_model(config)
        reference.load_state_dict(start)
        full_loss = sgd_step(MeanLoss(reference), x, t, noise).item()
        local = build_model(config)
        local.load_state_dict(start)
        sgd_step(MeanLoss(local), x[part], t[part], noise[part])
        def maxdiff(a, b):
            return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        print(f"WORLD {world} LOSS {mean_loss!r} FULL {full_loss!r} "
              f"VS_FULL {maxdiff(distributed, reference.state_dict())!r} "
              f"VS_LOCAL {maxdiff(distributed, local.state_dict())!r} MOVED {maxdiff(distributed, start)!r}",
              flush=True)
    """
)


def _env(**extra: str) -> dict[str, str]:
    """subprocess_env with the repository first on PYTHONPATH and ACCELERATE_USE_CPU=true (every rank joins one
    gloo group, infra/README.md), without the caller's DDGM_*/tracking settings."""
    return subprocess_env(unset=("DDGM_SHARDS", "DDGM_CHECKPOINT_DIR", "MLFLOW_TRACKING_URI"),
                          **{"PYTHONPATH": repo_pythonpath(), "ACCELERATE_USE_CPU": "true", **extra})


def _params(shards: Path, **train_values) -> dict:
    return {
        "data": {"out_dir": str(shards)},
        "diffusion": {"schedule": "cosine", "num_steps": 10},
        "model": {"network": "mlp", "hidden_dim": 32, "depth": 1, "variance": "learned_range"},
        "train": {"timestep_sampler": "importance", "lr": 1e-3, "batch_size": 16, "max_steps": 20,
                  "warmup_steps": 2, "mixed_precision": None, "val_every": 10, "val_max_images": 100,
                  "val_batch_size": 50, "val_chunk": 10, "checkpoint_every": 10, "log_every": 5} | train_values,
        "tracking": {"enabled": False},
    }


def _setup(workdir: Path, values: dict) -> None:
    (workdir / "p.yaml").write_text(yaml.safe_dump(values))
    (workdir / "rank_train.py").write_text(RANK_TRAIN)


def _launch(workdir: Path, *launch_args: str, script: str = "rank_train.py", timeout: float = 300):
    return subprocess.run(["accelerate", "launch", *launch_args, script, "p.yaml"], cwd=workdir, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _assert_ranks_agree(workdir: Path) -> None:
    for kind in ("model", "ema"):
        a, b = load_file(workdir / f"rank0-{kind}.safetensors"), load_file(workdir / f"rank1-{kind}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{kind} weights differ between the ranks"


def test_two_cpu_processes_train_identical_weights(tmp_path, digits_shards):
    _setup(tmp_path, _params(digits_shards))
    r = _launch(tmp_path, "--config_file", str(ACC / "cpu_2proc.yaml"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert rank_reports(r.stdout) == [f"RANK {i} WORLD 2 TYPE MULTI_CPU BACKEND gloo STEP 20" for i in range(2)], \
        r.stdout + r.stderr[-3000:]
    _assert_ranks_agree(tmp_path)
    checkpoint = tmp_path / "checkpoints/step-00000020"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    import json

    generators = json.loads((checkpoint / "training_state.json").read_text())["generators"]
    assert len(generators) == 2 and generators[0] != generators[1]  # each rank draws its own t and noise
    assert (tmp_path / "models/model.safetensors").is_file()
    assert [row.split("\t")[0] for row in (tmp_path / "plots/val_curve.tsv").read_text().splitlines()[1:]] == \
        ["10", "20"]


def test_one_process_checkpoint_resumes_on_two(tmp_path, digits_shards, monkeypatch, single_thread):
    values = _params(digits_shards)
    monkeypatch.chdir(tmp_path)
    first = dict(values, train=values["train"] | {"max_steps": 10})
    params = params_from_dict(first)
    train(params.model, params.diffusion, params.train, params.data.out_dir)
    _setup(tmp_path, values)
    r = _launch(tmp_path, "--config_file", str(ACC / "cpu_2proc.yaml"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "resumed from checkpoints/step-00000010 at step 10" in r.stdout
    assert "written by 1 processes, this run has 2" in r.stdout
    assert rank_reports(r.stdout) == [f"RANK {i} WORLD 2 TYPE MULTI_CPU BACKEND gloo STEP 20" for i in range(2)]
    _assert_ranks_agree(tmp_path)


def test_ddp_step_on_two_ranks_equals_one_step_on_the_whole_batch(tmp_path):
    (tmp_path / "grad_step.py").write_text(GRAD_STEP)
    (tmp_path / "p.yaml").write_text("")  # _launch passes it; the script ignores it
    r = _launch(tmp_path, "--config_file", str(ACC / "cpu_2proc.yaml"), script="grad_step.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("WORLD ")]
    fields = line.split()
    values = {fields[i]: float(fields[i + 1]) for i in range(0, len(fields), 2)}
    assert values["WORLD"] == 2
    assert values["LOSS"] == pytest.approx(values["FULL"], rel=1e-5)
    assert values["MOVED"] > 1e-3  # the step did something
    assert values["VS_FULL"] < 1e-5, line  # float rounding only
    assert values["VS_LOCAL"] > 100 * values["VS_FULL"], line  # and it was not just rank 0's half


def test_two_simulated_machines_train_identical_weights(tmp_path, digits_shards):
    _setup(tmp_path, _params(digits_shards, max_steps=10, val_every=10))
    port = free_port()
    procs, logs = [], []
    for machine in range(2):
        logs.append(tmp_path / f"machine{machine}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                ["accelerate", "launch", "--config_file", str(ACC / "multi_node_static.yaml"),
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "rank_train.py", "p.yaml"],
                cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    text = "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)
    assert codes == [0, 0], text[-6000:]
    assert rank_reports(text) == [f"RANK {i} WORLD 2 TYPE MULTI_CPU BACKEND gloo STEP 10" for i in range(2)], text
    _assert_ranks_agree(tmp_path)
    assert (tmp_path / "models/model.safetensors").is_file()
