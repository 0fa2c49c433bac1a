"""The benchmarks (benchmarks/README.md) on tiny settings on the CPU: each runs as its command says and reports what
it measures; bad input ends in one sentence. Their recorded numbers live in docs/BENCHMARKS.md and docs/results/."""

import dataclasses
import json
import math
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scripts import ROOT, SCRIPTS, definitions, read_metrics, run_script

TRL = "TRL is not installed: pip install --no-deps -r benchmarks/peers/requirements-trl.txt"  # benchmark-only (.ci/run)
METHODS = ["draft_full", "draft_k1", "draft_lv2", "ddpo_is", "ddpo_sf", "rwr_softmax", "rwr_sparse", "braid_boot",
           "braid_bonus", "braid_c0"]  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=900)


def has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


# ----------------------------------------------------------------------------------------------------------------------
# speed/


@pytest.mark.slow
def test_sampler_overhead_runs_its_equivalence_check_and_times_both(tiny_sd_path):
    """It asserts, before timing, that our loop and diffusers' pipeline give the same images."""
    result = run(["benchmarks/speed/sampler_overhead.py", "--model", tiny_sd_path, "--resolution", "16",
                  "--num-steps", "4", "--batch-size", "2", "--repeats", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio ours / diffusers:" in result.stdout


@pytest.mark.slow
def test_async_reward_serves_a_slow_reward_and_times_both_kinds_of_run():
    """On assets/tiny-sd, its default (the random tiny model is slower at the tiny preset's 32 px and 10 steps)."""
    result = run(["benchmarks/speed/async_reward.py", "--batches", "1", "--epochs", "2", "--repeats", "1",
                  "--delay", "0.2", "--num-steps", "3"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the server waits 0.20 s an answer" in result.stdout and "ratio background / in turn:" in result.stdout


@pytest.mark.slow
def test_family_memory_counts_the_published_shapes_and_each_flag_saves(tmp_path):
    """The modules built on the meta device have the published parameter counts (so their configs are the models'),
    and each memory flag lowers the step's estimate: block-wise checkpointing keeps a fraction of a call's
    activations, freeing the text encoders removes exactly their weights."""
    out = tmp_path / "memory.json"
    result = run(["benchmarks/speed/family_memory.py", "--resolutions", "256", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["model"].split()[0]: r for r in json.loads(out.read_text())["rows"]}
    published = {"SDXL": 2_567_463_684, "FLUX.1-dev": 11_901_408_320, "Qwen-Image": 20_430_401_088}
    assert {name: round(r["denoiser_B"] * 1e9) for name, r in rows.items()} == published
    assert rows["FLUX.1-dev"]["text_encoders_B"] == {"CLIP ViT-L": 0.12306048, "T5-XXL": 4.762310656}
    assert rows["Qwen-Image"]["text_encoders_B"] == {"Qwen2.5-VL-7B": 8.292166656}
    for r in rows.values():
        assert 0 < r["denoiser_call_activations_blockwise_GiB"] < r["denoiser_call_activations_GiB"] / 5
        freed = r["draft1_step_GiB"] - r["draft1_step_free_text_encoders_GiB"]
        assert freed == pytest.approx(r["text_encoder_weights_GiB"])
        assert r["draft1_step_both_levers_GiB"] <= r["draft1_step_free_text_encoders_GiB"]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_the_whole_plan(tmp_path):
    """The GPU machine's one command, at tiny shapes on the CPU: every kind of part ends (a DRaFT-1 step profiled by
    phase and kind of work through speed/profile_step.py; the six scripts through speed/sd14_scale.py; another
    family's pipeline built and run (SD 3.5's; SDXL's parts, the levers' included, run the same commands on its own
    model with other flags, and the batch-1 parts differ from the default ones only in their flags); the pairs with
    TRL through peers/trl_trainers.py), every run is timed with its FLOPs counted, both sides of each TRL pair do the
    same work, and the tables are written. TRL is a benchmark-only dependency; CI installs it (.ci/run)."""
    pytest.importorskip("trl", reason=TRL)
    out = tmp_path / "out"
    result = run(["benchmarks/speed/gpu_check.py", "--dry-run", "--out-dir", str(out), "--models-dir",
                  str(tmp_path / "models"), "--only", "profile sd14", "sd14 default", "sd35 draft", "trl"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [p["status"] for p in report["parts"]] == ["ok"] * 4, [(p["name"], p.get("tail")) for p in report["parts"]]
    (profile,) = [p["result"] for p in report["parts"] if "profile_step" in p["command"]]
    assert profile["phase_calls"] == {"sampling (no gradient)": 3, "the step with gradient": 1, "VAE decode": 1,
                                      "reward": 1}  # 4 steps, the last with gradient  # fmt: skip
    assert all(seconds > 0 for name, seconds in profile["phases"].items() if name != "backward: reward")
    assert (
        profile["kinds"]["convolutions"] > 0 and profile["kinds"]["matrix products"] > 0 and len(profile["top"]) == 15
    )
    assert sum(profile["kinds"].values()) == pytest.approx(profile["profiled_step_seconds"])
    rows = [r for p in report["parts"] if "sd14_scale" in p["command"] for r in p["result"]["results"]]
    assert sorted({r["script"] for r in rows}) == sorted(SCRIPTS) and len(rows) == 6 + 1
    assert all(r["images_per_sec"] > 0 and r["tflop_per_step"] > 0 for r in rows)
    assert all(0.2 < r["peak_rss_gb"] < 20 for r in rows)  # each script's own process: torch and the models at least
    (trl,) = [p["result"] for p in report["parts"] if "trl_trainers" in p["command"]]
    assert [s["pair"] for s in trl["summary"]] == ["ddpo", "draft1"]
    for pair, table in trl["same_work"].items():
        assert "| NO |" not in "\n".join(table) and any("unet_evaluations" in line for line in table), pair
    runs = [run for pair in trl["runs"].values() for side in pair.values() for run in side]
    assert len(runs) == 4 and all(run["images_per_sec"] > 0 and run["eval_reward"][0] > 0 for run in runs)
    table = (out / "gpu_check.md").read_text()
    assert "| sd35 draft_k.py --k 1 batch 1 | draft_k.py |" in table and "| ddpo |" in table
    assert "### profile sd14 draft_k.py --k 1" in table and "| sampling (no gradient) |" in table


def test_gpu_check_ends_with_exit_status_2_when_a_part_failed(tmp_path, monkeypatch, capsys):
    """A part that fails does not stop the plan (the others are still measured and written), but the command then
    says which parts failed in one sentence and exits 2, so that a failure is not read as a clean run. The parts' own
    runs are replaced by one that fails for ddpo.py (an out-of-memory, as CUDA showed once) and succeeds otherwise."""
    import benchmarks.shared

    def part(command, **kwargs):
        failed = any("ddpo.py" in c for c in command)
        return subprocess.CompletedProcess(command, int(failed), "", "torch.OutOfMemoryError: CUDA out of memory"
                                           if failed else "")  # fmt: skip

    monkeypatch.setattr(subprocess, "run", part)
    monkeypatch.setattr(benchmarks.shared, "build_models", lambda *args: None)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry-run", "--out-dir", str(out), "--only", "sd14 batch 1"])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(os.path.join(ROOT, "benchmarks/speed/gpu_check.py"), run_name="__main__")
    assert ended.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: 1 of 6 parts failed (sd14 batch 1 ddpo.py); gpu_check.md in {out} holds the last lines "
                     "each printed")  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text())
    assert [p["status"] for p in report["parts"]] == ["failed (exit 1)"] + ["ok"] * 5
    assert "CUDA out of memory" in (out / "gpu_check.md").read_text()


def test_flop_counter_counts_attention_by_its_shapes():
    """scaled_dot_product_attention on the CPU: 4 B H L S D forward (Q K^T and P V), 10 B H L S D backward (the
    scores again and four products), as torch counts its CUDA kernels; torch 2.13 alone counts 0 on the CPU."""
    from benchmarks.shared import FlopCounter

    b, h, length, s, d = 2, 3, 16, 24, 8
    q = torch.randn(b, h, length, d, requires_grad=True)
    k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    with FlopCounter() as forward:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with FlopCounter() as backward:
        out.sum().backward()
    assert forward.flops == 4 * b * h * length * s * d
    assert backward.flops == 10 * b * h * length * s * d


@pytest.mark.slow
def test_each_lever_switches_on_what_it_names(tiny_sd_path, monkeypatch, capsys):
    """benchmarks/speed/levers.py switches its levers on through common/hooks.py (and torch's AdamW); all are undone
    after this test."""
    import common.models
    from benchmarks.speed.levers import apply
    from common import hooks

    monkeypatch.setattr(torch.optim, "AdamW", torch.optim.AdamW)
    for name in ("model_loaded", "lora_added", "training_loop"):
        monkeypatch.setattr(hooks, name, [])
    precision, benchmark = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    try:
        apply(["tf32", "channels_last", "fused_adamw", "cudnn_benchmark", "compile"])
        assert torch.get_float32_matmul_precision() == "high"
        model = common.models.load_model(tiny_sd_path, resolution=16)
        assert torch.backends.cudnn.benchmark  # set once the model is loaded, after the run's own cuDNN settings
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.benchmark = benchmark
    assert model.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    params = model.add_lora(4)
    assert model.denoiser._compiled_call_impl is not None  # torch.compile'd in place; it compiles on the first call
    assert torch.optim.AdamW(params, lr=1e-3).defaults["fused"]
    with pytest.raises(SystemExit) as stopped:
        apply(["warp_speed"])
    assert stopped.value.code == 2 and "error: unknown lever(s) warp_speed" in capsys.readouterr().err


@pytest.mark.slow
def test_per_unet_call_counts_a_scripts_unet_passes(tmp_path):
    """Its DRaFT-1 case: per step, 19 passes without autograd and the last step's pass with it, plus its
    recomputation in the backward pass (checkpointed), batch 4 with guidance (8 rows each)."""
    result = run(["benchmarks/speed/per_unet_call.py", "--cases", "draft_k", "--repeats", "1",
                  "--out", str(tmp_path / "out.json")])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (case,) = json.loads((tmp_path / "out.json").read_text())["runs"]["draft_k"]
    assert case["unet_passes"] and all(
        passes == {"passes": 19, "rows": 152, "grad_passes": 2, "grad_rows": 16} for passes in case["unet_passes"]
    )
    assert len(case["cpu_seconds"]) == 10 and "| draft_k | draft_k.py --k 1" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# peers/


@pytest.mark.slow
def test_trl_trainers_counts_recomputations_apart_and_stops_on_different_work():
    """The same-work check: a UNet input seen again in the first iteration is a recomputation, not more work; any
    setting or work that differs between the sides ends the benchmark."""
    from benchmarks.peers.trl_trainers import check_same_work
    from benchmarks.shared import Meter

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


@pytest.mark.slow
def test_seiko_conventions_without_seiko(tmp_path):
    """It needs a checkout of SEIKO (not shipped): without one it ends with one sentence. Its loaders are checked here
    on a stand-in file and on braid.py's loss line, which it executes."""
    from benchmarks.peers.seiko_conventions import definitions, statement

    result = run(["benchmarks/peers/seiko_conventions.py", "--seiko-dir", str(tmp_path)])
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


# ----------------------------------------------------------------------------------------------------------------------
# results/


@pytest.mark.slow
def test_compare_quick_runs_every_method_resumes_and_summarizes(tiny_sd_path, tmp_path):
    """`python benchmarks/results/compare.py --quick` as the docs give it, into tmp_path, on the random tiny model
    (assets/tiny-sd takes minutes here) at 16 px and 4 steps (--extra), two one-thread runs at a time (as the full
    run's docs say): every method's run (TRL's row where TRL is installed), the summary beside them and never in
    docs/, and a second call that finds every run finished."""
    out, results_md = tmp_path / "runs", Path(ROOT, "docs", "RESULTS.md")
    recorded = results_md.read_text()
    command = ["benchmarks/results/compare.py", "--quick", "--output-dir", str(out), "--pretrained-model", tiny_sd_path,
               "--jobs", "2", "--extra=--resolution 16 --num-steps 4"]  # fmt: skip
    result = run(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    methods = METHODS + ["trl_ddpo"] * has_trl()
    assert sorted(json.loads((out / "sweep.json").read_text())["sweep"]) == sorted(methods)
    text = (out / "RESULTS.md").read_text()
    for row in (
        "| draft_k1 | 0.0004 | 1 | 24 / 0 |",
        "| ddpo_is | 0.03 | 1 | 32 / 0 |",
        "| braid_boot | 0.001 | 1 | 0 / 24 |",
    ):
        assert row in text, text
    assert {f"samples_{name}.png" for name in methods} <= set(os.listdir(out / "results"))
    assert results_md.read_text() == recorded  # a smoke run never writes the recorded results
    result = run(command)
    assert result.returncode == 0 and result.stdout.count("skip ") == len(methods), result.stdout[-3000:]


def held_out_drawn(seed: int, swapped: bool = False) -> torch.Tensor:
    """frontier.py's held-out prompts, twice, drawn as they ask (describe reads them back exactly), or with the shape's
    and the background's colours swapped (none right). Seed 0's are more colourful than seed 1's."""
    from benchmarks.results import frontier
    from common.shapes import COLOURS, SHAPES, draw, parse

    asked = [parse(p) for p in frontier.HELD_OUT * 2]
    index = {k: torch.tensor([names.index(a[k]) for a in asked]) for k, names in
             (("shape", SHAPES), ("colour", COLOURS), ("background", COLOURS))}  # fmt: skip
    colours = (index["background"], index["colour"]) if swapped else (index["colour"], index["background"])
    return draw(index["shape"], *colours, generator=torch.Generator().manual_seed(seed))


def test_frontier_reads_fidelity_reward_and_kl_back_and_stops_at_the_last_faithful_evaluation(tmp_path):
    """frontier.py --summarize on a run folder written here: grids of drawn images (describe reads them exactly) and
    a metrics.jsonl. The first two grids follow every prompt, the last swaps shape and background colours, so the
    fidelity-constrained best is the better of the first two, the end the last; RESULTS.md then leads with the
    section, and compare.py's own summary keeps it there."""
    from benchmarks.results import compare, frontier
    from common.rewards import make_reward
    from common.run import save_grid

    start, right, wrong = held_out_drawn(1), held_out_drawn(0), held_out_drawn(0, swapped=True)
    run_dir = tmp_path / "runs" / "draft_k1" / "lr1x_kl1" / "seed0" / "colorfulness__draft_k1__0__1"
    (run_dir / "samples").mkdir(parents=True)
    for step, images in ((0, start), (2, right), (4, wrong)):  # --budget 16: 4 steps of 4, an evaluation every 2
        save_grid(images, str(run_dir / "samples" / f"step_{step:06d}.png"), len(frontier.HELD_OUT))
    lines = [{"step": s, "eval_kl": 0.5 * s} for s in (1, 2, 3, 4)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    read = frontier.points(str(run_dir), "step", 4, frontier.HELD_OUT)
    assert [p["fidelity"] for p in read] == [1.0, 1.0, 0.0] and [p["kl"] for p in read] == [0.0, 1.0, 2.0]
    assert read[1]["reward"] == pytest.approx(make_reward("colorfulness")(right).mean().item(), rel=0.01)
    assert read[1]["reward"] > read[0]["reward"] and frontier.constrained(read) == read[1]  # 8-bit PNGs above
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\nthe comparison\n")
    runs, no_flow = str(tmp_path / "runs"), str(tmp_path / "no_flow_runs")  # the rate: docs/results/sweep.json's
    args = frontier.Args(output_dir=runs, docs_dir=str(docs), seeds=1, budget=16, flow_dir=no_flow)
    frontier.summarize(args)
    text = (docs / "RESULTS.md").read_text()
    row = f"| draft_k1 | 0.0012 | 1 | 1 | {read[1]['reward']:.1f} | 1 | 8 |"  # the swept rate in docs/results/
    assert text.startswith("# Results\n\n## Reward at equal prompt fidelity") and row in text, text
    assert text.rstrip().endswith("the comparison")
    again = compare.lead_with(compare.lead_with(text, "## Reward at equal prompt fidelity\n\nnew"), text)
    assert again.count("## Reward at equal prompt fidelity") == 1 and again.rstrip().endswith("the comparison")


def test_frontier_runs_every_setting_on_seed_0_then_the_best_and_the_reward_only_one_on_the_other_seeds(
    tmp_path, monkeypatch, capsys
):
    """frontier.py's runs, with compare.run_one replaced by one that writes a finished run folder at once: seed 0
    runs each of draft_k1's five settings; the best (here the tenth of the rate with KL 1, whose run reaches a more
    colourful faithful evaluation than the rest) and the reward-only setting then run on seeds 1 and 2; a run that
    fails (KL 10) does not stop the others, and the command ends naming it, with exit status 2."""
    from benchmarks.results import compare, frontier
    from common.run import save_grid

    start, better = held_out_drawn(1), held_out_drawn(0)
    lrs = frontier.learning_rates(frontier.Args(lrs=os.path.join(ROOT, "docs/results/sweep.json")))
    ran = []

    def run_one(flags, name, lr, seed, folder, more):
        setting = (round(lr / lrs[name], 6), float(more[1]))
        ran.append((setting, seed))
        if setting[1] == 10:
            raise RuntimeError(f"{name} failed")
        run_dir = Path(folder) / f"colorfulness__{name}__{seed}__1"
        (run_dir / "samples").mkdir(parents=True)
        for step in (0, 2, 4):  # --budget 16: 4 steps of 4, an evaluation every 2
            save_grid(better if step and setting == (0.1, 1.0) else start, str(run_dir / "samples" /
                      f"step_{step:06d}.png"), len(frontier.HELD_OUT))  # fmt: skip
        lines = [{"step": s, "eval_kl": 0.1 * s} for s in (1, 2, 3, 4)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    monkeypatch.setattr(compare, "run_one", run_one)
    out = tmp_path / "runs"
    args = frontier.Args(output_dir=str(out), methods=("draft_k1",), lrs=os.path.join(ROOT, "docs/results/sweep.json"),
                         budget=16)  # fmt: skip
    with pytest.raises(SystemExit) as ended:
        frontier.run_all(args)
    assert ended.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: 1 of the runs failed: draft_k1 lr x1 kl 10 seed 0 (each one's "
                                               "log.txt says why)")  # fmt: skip
    assert ran[:5] == [((1.0, 0.0), 0), ((1.0, 1.0), 0), ((1.0, 10.0), 0), ((0.1, 0.0), 0), ((0.1, 1.0), 0)]
    assert sorted(ran[5:]) == [((0.1, 1.0), 1), ((0.1, 1.0), 2), ((1.0, 0.0), 1), ((1.0, 0.0), 2)]
    assert (out / "held_out.txt").read_text().split("\n")[:-1] == frontier.HELD_OUT
    found = frontier.collect(args)["draft_k1"]
    assert len(found[(0.1, 1.0)]) == 3 and len(found[(1.0, 1.0)]) == 1 and (1.0, 10.0) not in found


@pytest.mark.slow
def test_trl_ddpo_task_writes_the_scripts_run_folder_with_their_evaluation(tiny_sd_path, tmp_path, monkeypatch):
    """TRL's DDPOTrainer with ddpo.py's flags for 2 epochs on the random tiny model: the metrics lines and grids that
    compare.py reads, and at epoch 0 (the untrained model, LoRA B = 0) the very grid that ddpo.py draws, so that its
    held-out reward means what the scripts' does."""
    pytest.importorskip("trl", reason=TRL)
    from benchmarks.results.compare import held_out_reward

    tiny = ["--preset", "tiny", "--pretrained-model", tiny_sd_path, "--prompts", "shapes", "--reward", "colorfulness",
            "--resolution", "16", "--num-steps", "4", "--guidance-scale", "5", "--samples-per-epoch", "4",
            "--sample-batch-size", "2", "--train-batch-size", "2", "--seed", "3", "--save-every", "2"]  # fmt: skip
    result = run(["benchmarks/results/trl_ddpo_task.py", *tiny, "--estimator", "is", "--num-epochs", "2",
                  "--sample-every", "2", "--learning-rate", "0.03", "--exp-name", "trl",
                  "--output-dir", str(tmp_path / "trl")])  # fmt: skip
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


def test_results_md_keeps_what_people_wrote_and_writes_no_conclusion_of_its_own():
    """compare.py --summarize regenerates RESULTS.md's numbers; the blocks people wrote under them (what a figure
    shows, why a claim fails here) are kept from the file as it was, and a block nobody has written says so."""
    from benchmarks.results.compare import END, HAND, hand_written

    existing = f"# Results\n\n{HAND.format('samples')}\nThe colours win.\n\nThe shapes go.\n{END}\n\nmore"
    assert hand_written("samples", existing) == [HAND.format("samples"), "The colours win.\n\nThe shapes go.", END]
    start, text, end = hand_written("claims", existing)
    assert (start, end) == (HAND.format("claims"), END) and text.startswith("(Not written yet")
    recorded = Path(ROOT, "docs", "RESULTS.md").read_text()
    for name in ("samples", "claims"):  # the recorded page's blocks are where --summarize will find them
        assert not hand_written(name, recorded)[1].startswith("(Not written yet"), name


def test_the_prompt_following_section_goes_last_and_replaces_its_earlier_self():
    """prompt_following.py --summarize puts its section at the end of RESULTS.md; compare.py --summarize, which
    rewrites the page, puts it back there (with its hand-written block as the page has it)."""
    from benchmarks.results.compare import PROMPT_FOLLOWING, with_last_section

    page = f"# Results\n\n## A\n\na\n\n{PROMPT_FOLLOWING}\n\nold\n\n## B\n\nb\n"
    expected = f"# Results\n\n## A\n\na\n\n## B\n\nb\n\n{PROMPT_FOLLOWING}\n\nnew\n"
    assert with_last_section(page, f"{PROMPT_FOLLOWING}\n\nnew\n") == expected
    assert with_last_section(expected, f"{PROMPT_FOLLOWING}\n\nnew\n") == expected
    assert with_last_section("# Results\n", f"{PROMPT_FOLLOWING}\n\nnew") == f"# Results\n\n{PROMPT_FOLLOWING}\n\nnew\n"


@pytest.mark.slow
def test_trl_ddpo_task_defaults_are_ddpo_tiny_preset():
    """Its flags' defaults are `ddpo.py --preset tiny`'s, and what it has no flag for is ddpo.py's default."""
    ddpo = definitions("ddpo.py")
    task = runpy.run_path(os.path.join(ROOT, "benchmarks", "results", "trl_ddpo_task.py"))
    tiny = dataclasses.replace(ddpo["Args"](), preset="tiny", **ddpo["PRESETS"]["tiny"])
    ours = task["Args"]()
    for field in dataclasses.fields(ours):
        if field.name != "exp_name":
            assert getattr(ours, field.name) == getattr(tiny, field.name), field.name
    assert {k: getattr(tiny, k) for k in task["FROM_DDPO"]} == task["FROM_DDPO"]


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one sentence, exit status 2, never a traceback


@pytest.mark.slow
@pytest.mark.parametrize("bad, message", [
    (["benchmarks/speed/sampler_overhead.py", "--repeats", "0"], "--resolution, --batch-size, --num-steps and"),
    (["benchmarks/speed/profile_step.py", "--steps", "0"], "--batch-size, --warmup and --steps must be at least 1"),
    (["benchmarks/speed/levers.py", "turbo", "draft_k.py"], "fused_adamw, cudnn_benchmark, compile"),
    (["benchmarks/speed/async_reward.py", "--epochs", "1"], "--batches, --repeats and --num-steps must be at least 1"),
    (["benchmarks/speed/levers.py", "warp_speed", "draft_k.py"], "unknown lever(s) warp_speed"),
    (["benchmarks/speed/levers.py", "tf32", "nope.py"], "nope.py is not a script of this repository"),
    (["benchmarks/speed/sd14_scale.py", "--levers", "warp_speed"], "unknown lever(s) ['warp_speed']"),
    (["benchmarks/speed/sd14_scale.py", "--scripts", "ppo.py"], "unknown script(s) ['ppo.py']"),
    (["benchmarks/speed/sd14_scale.py", "--steps", "1"], "--steps must be at least 2 to count the FLOPs"),
    (["benchmarks/speed/gpu_check.py"], "no GPU is visible to torch; gpu_check.py measures a GPU"),
    (["benchmarks/speed/per_unet_call.py", "--cases", "nope"], "unknown case(s) ['nope']"),
    (["benchmarks/speed/per_unet_call.py", "--repeats", "0"], "--repeats and --threads must be at least 1"),
    (["benchmarks/peers/trl_trainers.py", "--draft-steps", "2"], "--draft-steps must be at least 3, got 2"),
    (["benchmarks/peers/trl_trainers.py", "--pairs", "ddpo", "--ddpo-timesteps-per-call", "3"],  # ddpo.py's own
     "the ours run of ddpo: --timesteps-per-call must be a divisor of the steps trained per trajectory"),
    (["benchmarks/results/compare.py", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["benchmarks/results/compare.py", "--methods", "ppo"], "unknown methods ['ppo']"),
    (["benchmarks/results/compare.py", "--budget", "16"], "--budget must be at least 21 with braid_boot, braid_bonus"),
    (["benchmarks/results/compare.py", "--summarize", "--output-dir", "TMP/runs", "--docs-dir", "TMP/docs"],
     "no finished runs under"),
    (["benchmarks/results/frontier.py", "--methods", "ppo"], "unknown methods ['ppo']"),
    (["benchmarks/results/frontier.py", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["benchmarks/results/frontier.py", "--lrs", "TMP/sweep.json"], "sweep.json does not exist: it is compare.py's"),
    (["benchmarks/results/frontier.py", "--summarize", "--output-dir", "TMP/runs", "--docs-dir", "TMP/docs"],
     "no finished runs under"),
    (["benchmarks/results/trl_ddpo_task.py", "--sample-batch-size", "3"], "--samples-per-epoch must be a multiple"),
    (["benchmarks/results/prompt_following.py", "--settings", "ppo"], "unknown setting(s) ppo"),
    (["benchmarks/results/prompt_following.py", "--summarize", "--output-dir", "TMP/runs"], "no finished run under"),
])  # fmt: skip
def test_bad_input_ends_with_one_sentence(bad, message, tmp_path, monkeypatch, capsys):
    """Each is refused before anything is loaded or written (TMP: this test's folder, for what would read runs). Run
    in this process, as `python FILE ...` would run it, to spare a Python start per case."""
    if "trl_trainers" in bad[0]:  # it checks the TRL version first
        pytest.importorskip("trl", reason=TRL)
    argv = [part.replace("TMP", str(tmp_path)) for part in bad]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the files put the repository's root first
    threads, rng = torch.get_num_threads(), torch.get_rng_state()  # a file may set them before it refuses
    try:
        with pytest.raises(SystemExit) as ended, warnings.catch_warnings():
            runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    finally:  # the tests after this one run in this process too
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    stderr = capsys.readouterr().err
    assert ended.value.code == 2 and stderr.count("\n") == 1, stderr[-3000:]
    assert stderr.startswith("error: ") and message in stderr, stderr
