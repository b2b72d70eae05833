"""The example trainers run end to end for a few steps, with the fused and the
reference implementations, and report their accuracies (a smoke test: the
accuracy figures of full runs are in the README)."""

import json
import os
import subprocess
import sys

import pytest

from ssl_ops import emulation

pytest.importorskip("sklearn")
pytest.importorskip("timm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "resnet10t", "--epochs", "1", "--max-steps", "2", "--batch-size", "32",
        "--probe-steps", "5", "--finetune-epochs", "1", "--device", "cpu"]


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("example", ["simclr", "moco", "byol"])
def test_example_runs(tmp_path, example, impl):
    """Pre-training and evaluation with the fused loss; the reference loss
    pre-trains only (the evaluation is the same code for both)."""
    out = tmp_path / "result.json"
    only = ["--pretrain-only"] if impl == "reference" else []
    cmd = [sys.executable, os.path.join(ROOT, "examples", f"{example}.py"), *TINY, "--loss-impl", impl,
           "--json", str(out), *only]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pretrain"]["steps"] == 2 and result["loss_impl"] == impl
    assert "2 steps in" in proc.stdout
    if only:
        assert result["accuracy"] == {} and "| random init |" not in proc.stdout
        return
    for side in ("ssl", "random_init"):
        for stage in ("linear_probe", "fine_tune"):
            assert 0.0 <= result["accuracy"][side][stage] <= 1.0
    assert "| random init |" in proc.stdout


def test_pretrained_without_weights_says_so(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, os.path.join(ROOT, "examples", "simclr.py"), *TINY, "--pretrained"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0
    assert "could not load pretrained weights for timm model 'resnet10t'" in proc.stderr


def run_example(tmp_path, example, *extra):
    out = tmp_path / f"{example}{'-'.join(extra)}.json"
    cmd = [sys.executable, os.path.join(ROOT, "examples", f"{example}.py"), *TINY, "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.emu
@pytest.mark.parametrize("example", ["simclr", "moco", "byol"])
def test_two_steps_on_the_emulated_cuda_route_match_the_cpu_kernels(tmp_path, example):
    """--emulate-cuda: the losses and the momentum update of each training step
    run the CUDA code path (GEMM route, EMA kernel) on the emulator."""
    if not emulation.available():  # the loaded one: _cuda_emu, or _cuda_emu_asan in the ASan pass
        pytest.skip("emulation module not built (SSL_OPS_BUILD_EMU=0)")
    # The comparison is of the pre-training losses: the evaluation is not run.
    cpu = run_example(tmp_path, example, "--pretrain-only")
    emulated = run_example(tmp_path, example, "--pretrain-only", "--emulate-cuda")
    assert emulated["pretrain"]["steps"] == cpu["pretrain"]["steps"] == 2
    for key in ("first_loss", "last_loss"):
        assert emulated["pretrain"][key] == pytest.approx(cpu["pretrain"][key], rel=1e-4), key
