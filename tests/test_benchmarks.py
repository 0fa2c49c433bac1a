"""The SD-1.4-scale benchmark's code path, on tiny shapes on the CPU (the GPU numbers live in docs/BENCHMARKS.md)."""
import json
import subprocess
import sys

from scripts import ROOT


def test_sd14_scale_benchmark_runs_on_tiny_shapes(tmp_path):
    command = [sys.executable, "benchmarks/sd14_scale.py", "--tiny", "--steps", "2", "--scripts", "draft_k.py",
               "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "out.json").read_text())["results"]
    assert row["script"] == "draft_k.py" and row["images_per_sec"] > 0 and row["tflop_per_step"] > 0
    assert "| draft_k.py |" in result.stdout
