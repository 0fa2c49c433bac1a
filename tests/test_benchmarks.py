"""The SD-1.4-scale benchmark's code path, on tiny shapes on the CPU (the GPU numbers live in docs/BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from scripts import ROOT


def test_sd14_scale_benchmark_runs_on_tiny_shapes(tmp_path):
    command = [sys.executable, "benchmarks/sd14_scale.py", "--tiny", "--steps", "2", "--scripts", "draft_k.py",
               "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "out.json").read_text())["results"]
    assert row["script"] == "draft_k.py" and row["images_per_sec"] > 0 and row["tflop_per_step"] > 0
    assert "| draft_k.py |" in result.stdout


def test_each_lever_switches_on_what_it_names(tiny_sd_path, monkeypatch):
    """benchmarks/levers.py patches what the scripts call; the patches are undone after this test."""
    import common.sd
    from benchmarks.levers import apply

    for module, name in [(torch.optim, "AdamW"), (common.sd, "load_sd"), (common.sd, "add_lora")]:
        monkeypatch.setattr(module, name, getattr(module, name))
    precision = torch.get_float32_matmul_precision()
    try:
        apply(["tf32", "channels_last", "fused_adamw", "compile"])
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(precision)
    sd = common.sd.load_sd(tiny_sd_path)
    assert sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert sd.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    params = common.sd.add_lora(sd.unet, 4)
    assert sd.unet._compiled_call_impl is not None  # torch.compile'd in place; it compiles on the first call
    assert torch.optim.AdamW(params, lr=1e-3).defaults["fused"]
    with pytest.raises(SystemExit, match="unknown lever"):
        apply(["warp_speed"])


def test_a_script_runs_with_levers(tiny_sd_path, tmp_path):
    """Not `compile`: compiling the UNet on the CPU takes minutes (it ran once, in 12 min, with sd14_scale --tiny)."""
    command = [sys.executable, "benchmarks/levers.py", "tf32,channels_last,fused_adamw", "draft_k.py",
               "--pretrained-model", tiny_sd_path, "--reward", "colorfulness", "--resolution", "16", "--num-steps", "4",
               "--batch-size", "2", "--train-steps", "1", "--output-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = os.listdir(tmp_path)
    assert os.path.isfile(os.path.join(tmp_path, run, "pytorch_lora_weights.safetensors"))


def test_compare_quick_runs_resumes_and_summarizes(tiny_sd_path, tmp_path):
    """benchmarks/compare.py --quick on the random tiny model, a method counted in steps and one in epochs: the runs,
    a second call that skips them as finished, and the summary (its curves only where matplotlib is installed).
    BRAID is left out: its reward model's fit alone would double the time (the full run exercises it)."""
    out, docs = str(tmp_path / "runs"), str(tmp_path / "docs")
    command = [sys.executable, "benchmarks/compare.py", "--quick", "--output-dir", out, "--pretrained-model",
               tiny_sd_path, "--extra=--resolution 16 --num-steps 4", "--methods", "draft_k1", "ddpo_is"]  # fmt: skip
    for _ in range(2):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("skip ") == 2, result.stdout  # the second call found both finished
    sweep = json.loads((tmp_path / "runs" / "sweep.json").read_text())["sweep"]
    assert sorted(sweep) == ["ddpo_is", "draft_k1"]
    summary = [
        sys.executable,
        "benchmarks/compare.py",
        "--quick",
        "--summarize",
        "--output-dir",
        out,
        "--docs-dir",
        docs,
    ]
    result = subprocess.run(summary, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| draft_k1 | 0.0004 | 1 | 16 / 0 |" in text and "| ddpo_is | 0.03 | 1 | 32 / 0 |" in text
    figures = set(os.listdir(tmp_path / "docs" / "results"))
    assert {"samples_draft_k1.png", "samples_ddpo_is.png"} <= figures
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # CI installs only requirements.txt: no curves, and the summary says so
    assert {"reward_vs_queries.png", "reward_vs_seconds.png"} <= figures
