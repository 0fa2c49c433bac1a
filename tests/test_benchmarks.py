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
