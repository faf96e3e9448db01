"""benchmarks/gpu_check.py: the CPU dry run writes every figure into its JSON report; a section or a
throughput variant that fails is recorded and the check goes on; the report is on disk after every section."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from support import ROOT, subprocess_env

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["environment", "bits_per_dim", "bf16_step", "seeded_sampling", "loader", "train_throughput",
            "peak_memory"]


@pytest.fixture(scope="module")
def gpu_check():
    """The script imported as a module (benchmarks/ is not a package); registered while in use, as
    dataclasses need its module in sys.modules."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_cpu_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["status"] == "complete" and report["device"] == "cpu"
    sections = report["sections"]
    assert list(sections) == SECTIONS
    assert {name: r["status"] for name, r in sections.items()} == dict.fromkeys(SECTIONS, "ok")

    assert sections["environment"]["torch"] == torch.__version__
    bpd = sections["bits_per_dim"]
    assert bpd["passed"] and bpd["matches_library_elbo_terms"] and bpd["tolerance"] == 1e-4
    assert bpd["relative_difference"] <= 1e-4 and _positive(bpd["cpu_bits_per_dim"]) and bpd["num_steps"] == 100
    bf16 = sections["bf16_step"]
    assert bf16["passed"] and bf16["bf16_grads_finite"] and bf16["device_generator_step"] == "ok"
    assert _positive(bf16["bf16_loss"]) and _positive(bf16["fp32_loss"])
    sampling = sections["seeded_sampling"]
    assert sampling["passed"] and sampling["ancestral"]["identical"] and sampling["ancestral"]["other_seed_differs"]
    loader = sections["loader"]
    assert set(loader["images_per_s"]) == {"0", "1"} and all(map(_positive, loader["images_per_s"].values()))
    assert _positive(loader["in_memory_images_per_s"]) and loader["image_shape"] == [3, 32, 32]
    assert set(loader["seconds_to_first_batch"]) == {"0", "1"}

    train = sections["train_throughput"]
    variants = train["variants"]
    assert train["preset"].endswith("cifar10-32.yaml") and _positive(train["parameters"])
    for name in ("fp32", "bf16"):
        assert variants[name]["status"] == "ok" and variants[name]["losses_finite"]
        assert _positive(variants[name]["images_per_s"]) and _positive(variants[name]["resident_gib"])
    assert variants["fp32"]["vs_fp32"] == 1.0
    for name in ("fp32_tf32", "fp32_compile", "bf16_compile"):  # CUDA-only or too slow for a CPU dry run
        assert variants[name]["status"] == "skipped" and variants[name]["reason"]
    assert _positive(sections["peak_memory"]["peak_rss_gib"])
    assert "bits_per_dim      PASS" in done.stdout and "images/s" in done.stdout


def test_failing_section_is_recorded_and_the_next_one_runs(gpu_check, monkeypatch, tmp_path):
    out = tmp_path / "report.json"
    seen_on_disk = {}

    def failing(ctx, record):
        seen_on_disk.update(json.loads(out.read_text())["sections"])
        record["partial_figure"] = 1.5
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setitem(gpu_check.SECTIONS, "seeded_sampling", failing)
    status = gpu_check.main(["--device", "cpu", "--smoke", "--out", str(out),
                             "--only", "environment,seeded_sampling,peak_memory"])
    assert status == 1
    # the earlier section was already on disk while the failing one ran
    assert seen_on_disk["environment"]["status"] == "ok" and seen_on_disk["seeded_sampling"]["status"] == "running"
    report = json.loads(out.read_text())
    failed = report["sections"]["seeded_sampling"]
    assert failed["status"] == "failed" and failed["partial_figure"] == 1.5
    assert failed["error"] == "RuntimeError: CUDA error: device-side assert triggered"
    assert "failing" in failed["traceback"]
    assert report["status"] == "complete" and report["sections"]["peak_memory"]["status"] == "ok"


@pytest.mark.usefixtures("single_thread")
def test_failing_throughput_variant_is_recorded_and_the_others_are_measured(gpu_check, monkeypatch, tmp_path):
    out = tmp_path / "report.json"
    real_step, bf16_calls = gpu_check.train_step, []

    def step_failing_in_bf16_after_warm_up(*args, dtype=None, **kwargs):
        if dtype is torch.bfloat16:
            bf16_calls.append(1)
            if len(bf16_calls) > 1:
                raise RuntimeError("CUDA out of memory")
        return real_step(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(gpu_check, "train_step", step_failing_in_bf16_after_warm_up)
    status = gpu_check.main(["--device", "cpu", "--smoke", "--out", str(out), "--only", "train_throughput"])
    assert status == 0  # the section ran; its failed variant is in its record
    records = json.loads(out.read_text())["sections"]["train_throughput"]["variants"]
    assert records["bf16"]["status"] == "failed" and records["bf16"]["error"] == "RuntimeError: CUDA out of memory"
    assert _positive(records["bf16"]["first_step_s"])  # what it measured before failing is kept
    assert records["fp32"]["status"] == "ok" and records["fp32"]["timed_steps"] == 2  # both rounds
    assert _positive(records["fp32"]["images_per_s"])


def test_spent_time_budget_skips_sections_with_the_reason(gpu_check, tmp_path):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--out", str(out), "--time-budget", "0"]) == 1
    sections = json.loads(out.read_text())["sections"]
    assert sections["environment"]["status"] == "ok" and sections["peak_memory"]["status"] == "ok"
    for name in SECTIONS[1:-1]:
        assert sections[name]["status"] == "skipped" and sections[name]["reason"].startswith("time budget")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_cuda_without_a_gpu_is_refused_with_the_reason(gpu_check, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", "cuda", "--out", str(tmp_path / "report.json")])
    assert exit_info.value.code == 2 and "torch.cuda.is_available() is False" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
