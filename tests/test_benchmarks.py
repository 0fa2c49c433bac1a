"""The SD-1.4-scale benchmark's code path, on tiny shapes on the CPU (the GPU numbers live in docs/BENCHMARKS.md)."""

import dataclasses
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scripts import ROOT, definitions, read_metrics, run_script

NO_TRL = "TRL is not installed: pip install --no-deps -r benchmarks/requirements-peers.txt"  # benchmark-only (.ci/run)


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
    """benchmarks/compare.py --quick on the random tiny model, a method counted in steps and one in epochs, side by
    side (--jobs 2): the runs, a second call that skips them as finished, both in sweep.json, and the summary (its
    curves only where matplotlib is installed).
    BRAID is left out: its reward model's fit alone would double the time (the full run exercises it)."""
    out, docs = str(tmp_path / "runs"), str(tmp_path / "docs")
    command = [sys.executable, "benchmarks/compare.py", "--quick", "--output-dir", out, "--pretrained-model",
               tiny_sd_path, "--extra=--resolution 16 --num-steps 4", "--methods", "draft_k1", "ddpo_is",
               "--jobs", "2"]  # fmt: skip
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


@pytest.mark.parametrize("bad, message", [
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--methods", "ppo"], "unknown methods ['ppo']"),
    (["--summarize"], "no finished runs under"),
])  # fmt: skip
def test_compare_bad_input_ends_with_one_sentence(bad, message, tmp_path):
    command = [sys.executable, "benchmarks/compare.py", "--output-dir", str(tmp_path / "runs"), "--docs-dir",
               str(tmp_path / "docs"), *bad]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("bad, message", [
    (["benchmarks/per_unet_call.py", "--cases", "nope"], "unknown case(s) ['nope']"),
    (["benchmarks/per_unet_call.py", "--repeats", "0"], "--repeats and --threads must be at least 1"),
    (["benchmarks/peers.py", "--draft-steps", "2"], "--draft-steps must be at least 3, got 2"),
    (["benchmarks/peers.py", "--pairs", "ddpo", "--ddpo-timesteps-per-call", "3"],  # ddpo.py's own refusal, passed on
     "the ours run of ddpo: --timesteps-per-call must be a divisor of the trained timesteps"),
])  # fmt: skip
def test_peers_and_per_unet_call_bad_input_ends_with_one_sentence(bad, message, tmp_path):
    if "peers.py" in bad[0]:
        pytest.importorskip("trl", reason=NO_TRL)
    command = [sys.executable, *bad, "--out", str(tmp_path / "out.json")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_peers_benchmark_runs_both_pairs_on_tiny_sd(tmp_path):
    """benchmarks/peers.py on tiny settings (2 DDIM steps, batches of 2): every run ends, both sides do the same work
    and the report is written. TRL is a benchmark-only dependency; CI installs it (.ci/run)."""
    pytest.importorskip("trl", reason=NO_TRL)
    command = [sys.executable, "benchmarks/peers.py", "--num-steps", "2", "--ddpo-epochs", "3", "--draft-steps", "3",
               "--repeats", "1", "--samples-per-epoch", "4", "--sample-batch-size", "2", "--train-batch-size", "2",
               "--batch-size", "2", "--out", str(tmp_path / "peers.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "peers.json").read_text())
    assert [s["pair"] for s in report["summary"]] == ["ddpo", "draft1"]
    for pair, table in report["same_work"].items():
        assert "| NO |" not in "\n".join(table) and any("unet_evaluations" in line for line in table), pair
    runs = [run for pair in report["runs"].values() for side in pair.values() for run in side]
    assert len(runs) == 4 and all(run["images_per_sec"] > 0 and run["eval_reward"][0] > 0 for run in runs)
    assert "| ddpo.py vs DDPOTrainer |" in result.stdout


def test_peers_counts_recomputations_apart_and_stops_on_different_work():
    """The same-work check: a UNet input seen again in the first iteration is a recomputation, not more work; any
    setting or work that differs between the sides ends the benchmark."""
    from benchmarks.peers import Meter, check_same_work

    meter, unet = Meter(), torch.nn.Identity()
    latents, embeds = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 32)
    meter.mark()  # the first iteration starts
    meter.unet_call(unet, (latents, torch.tensor(981)), {"encoder_hidden_states": embeds})
    meter.unet_call(unet, (latents.clone(), torch.tensor(981), embeds), {})  # checkpointing's recomputation
    meter.unet_call(unet, (latents, torch.tensor([1, 21, 41, 61])), {"encoder_hidden_states": embeds})
    meter.mark()  # the second: no longer recorded
    meter.unet_call(unet, (latents * 2, torch.tensor(1)), {"encoder_hidden_states": embeds})
    meter.mark()
    result = meter.result(images_per_iteration=4)
    assert result["work"]["unet_evaluations"] == 2 and result["work"]["rows"] == 8 and result["recomputations"] == 1
    assert result["work"]["timesteps"] == "5: 981 ... 1" and result["work"]["latent_shape"] == [4, 8, 8]
    ours = {"settings": {"num_steps": 20, "lr": 3e-4}, "work": result["work"], "eval_reward": [110.5, 111.0],
            "recomputations": 1}  # fmt: skip
    check_same_work("ddpo", ours, {**ours, "recomputations": 0})  # recomputations are not compared
    for theirs in ({**ours, "settings": {"num_steps": 20, "lr": 1e-3}}, {**ours, "eval_reward": [109.0, 111.0]}):
        with pytest.raises(SystemExit, match="do not do the same work"):
            check_same_work("ddpo", ours, theirs)


def test_per_unet_call_benchmark_counts_a_scripts_unet_passes(tmp_path):
    """benchmarks/per_unet_call.py on its DRaFT-1 case: per step, 19 passes without autograd and the last step's pass
    with it, plus its recomputation in the backward pass (checkpointed), batch 4 with guidance (8 rows each)."""
    command = [sys.executable, "benchmarks/per_unet_call.py", "--cases", "draft_k", "--repeats", "1",
               "--out", str(tmp_path / "out.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads((tmp_path / "out.json").read_text())["runs"]["draft_k"]
    assert run["unet_passes"] and all(
        passes == {"passes": 19, "rows": 152, "grad_passes": 2, "grad_rows": 16} for passes in run["unet_passes"]
    )
    assert len(run["cpu_seconds"]) == 10 and "| draft_k | draft_k.py --k 1" in result.stdout


def test_trl_ddpo_task_writes_the_scripts_run_folder_with_their_evaluation(tiny_sd_path, tmp_path, monkeypatch):
    """benchmarks/trl_ddpo_task.py (TRL's DDPOTrainer with ddpo.py's flags) for 2 epochs on the random tiny model: the
    metrics lines and grids that compare.py reads, and at epoch 0 (the untrained model, LoRA B = 0) the very grid that
    ddpo.py draws, so that its held-out reward means what the scripts' does."""
    pytest.importorskip("trl", reason=NO_TRL)
    from benchmarks.compare import held_out_reward

    tiny = ["--preset", "tiny", "--pretrained-model", tiny_sd_path, "--prompts", "shapes", "--reward", "colorfulness",
            "--resolution", "16", "--num-steps", "4", "--guidance-scale", "5", "--samples-per-epoch", "4",
            "--sample-batch-size", "2", "--train-batch-size", "2", "--seed", "3", "--save-every", "2"]  # fmt: skip
    command = [sys.executable, "benchmarks/trl_ddpo_task.py", *tiny, "--estimator", "is", "--num-epochs", "2",
               "--sample-every", "2", "--learning-rate", "0.03", "--exp-name", "trl",
               "--output-dir", str(tmp_path / "trl")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, metrics = read_metrics(tmp_path / "trl")
    assert os.path.basename(run_dir).startswith("colorfulness__trl__3__")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["images_per_sec"] > 0 and m["reward_mean"] > 0 and math.isfinite(m["loss"]) for m in metrics)
    assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == ["epoch_000000.png", "epoch_000002.png"]
    grid = os.path.join(run_dir, "samples", "epoch_000002.png")
    assert metrics[-1]["eval_reward_mean"] == pytest.approx(held_out_reward(grid), rel=0.02)  # 8-bit PNG
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "epoch_000002", "pytorch_lora_weights.safetensors"))

    run_script("ddpo.py", [*tiny, "--num-epochs", "1", "--output-dir", str(tmp_path / "ddpo")], monkeypatch)
    ddpo_dir, _ = read_metrics(tmp_path / "ddpo")
    ours, theirs = (Path(run, "samples", "epoch_000000.png").read_bytes() for run in (run_dir, ddpo_dir))
    assert ours == theirs


def test_trl_ddpo_task_defaults_are_ddpo_tiny_preset():
    """Its flags' defaults are `ddpo.py --preset tiny`'s, and what it has no flag for is ddpo.py's default."""
    pytest.importorskip("trl", reason=NO_TRL)
    ddpo, task = definitions("ddpo.py"), runpy.run_path(os.path.join(ROOT, "benchmarks", "trl_ddpo_task.py"))
    tiny = dataclasses.replace(ddpo["Args"](), preset="tiny", **ddpo["PRESETS"]["tiny"])
    ours = task["Args"]()
    for field in dataclasses.fields(ours):
        if field.name != "exp_name":
            assert getattr(ours, field.name) == getattr(tiny, field.name), field.name
    assert {k: getattr(tiny, k) for k in task["FROM_DDPO"]} == task["FROM_DDPO"]


def test_seiko_conventions_without_seiko(tmp_path):
    """benchmarks/seiko_conventions.py needs a checkout of SEIKO (not shipped): without one it ends with one sentence.
    Its loaders are checked here on a stand-in file and on braid.py's loss line, which it executes."""
    from benchmarks.seiko_conventions import definitions, statement

    command = [sys.executable, "benchmarks/seiko_conventions.py", "--seiko-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert "is not a checkout of zhaoyl18/SEIKO" in result.stderr
    # only the named definitions run: not the file's imports of what is not installed
    (tmp_path / "seiko.py").write_text("import wandb\n\ndef f(x):\n    return 2 * x\n\ndef g():\n    pass\n")
    assert definitions(tmp_path / "seiko.py", ["f"], {})["f"](3) == 6
    with pytest.raises(SystemExit):
        definitions(tmp_path / "seiko.py", ["h"], {})
    rewards, kl = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    namespace = {"rewards": rewards, "kl": kl, "args": SimpleNamespace(kl_weight=0.5, grad_accum_steps=2)}
    exec(statement(Path(ROOT) / "braid.py", "loss = (-rewards"), namespace)
    assert namespace["loss"].item() == ((-rewards + 0.5 * kl).mean() / 2).item()
