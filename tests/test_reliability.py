"""Bad values and faults a hostile but realistic user meets: every one ends in one sentence and exit status 2, or
is survived (a run killed while writing a checkpoint resumes to the uninterrupted run's numbers)."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler

import common.checkpoint
from scripts import LENGTH, ROOT, SCRIPTS, TINY, read_metrics, run_script

# flags every script shares: (arguments, a fragment of the sentence)
SHARED_BAD = [
    (["--learning-rate", "-1e-3"], "--learning-rate must be in (0, 1], got -0.001"),
    (["--learning-rate", "nan"], "--learning-rate must be in (0, 1], got nan"),
    (["--learning-rate", "1e30"], "--learning-rate must be in (0, 1], got 1e+30"),
    (["--weight-decay", "-1"], "--weight-decay must be at least 0, got -1.0"),
    (["--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
    (["--seed", str(2**40)], "--seed must be between 0 and 2**32 - 1"),
    (["--save-every", "0"], "--save-every must be at least 1, got 0"),
    (["--sample-every", "0"], "--sample-every must be at least 1, got 0"),
    (["--eta", "2"], "--eta must be between 0 and 1, got 2.0"),
    (["--eta", "-1"], "--eta must be"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a positive number, got -1.0"),
    (["--guidance-scale", "-1"], "--guidance-scale must be at least 1 (1: no guidance), got -1.0"),
    (["--exp-name", "../../x"], "--exp-name must be letters, digits, _ . + -, got '../../x'"),
    ([None, "0"], "must be at least 1, got 0"),  # --train-steps or --num-epochs
    ([None, "-3"], "must be at least 1, got -3"),
    # the last: it is checked against the model's scheduler, once the run folder exists
    (["--num-steps", "1001"], "--num-steps must be at most the scheduler's 1000 training timesteps, got 1001"),
]
METHOD_BAD = [
    ("draft_lv.py", ["--n", "0"], "--n must be at least 1, got 0"),
    ("ddpo.py", ["--clip-range", "-1"], "--clip-range must be a positive number, got -1.0"),
    ("ddpo.py", ["--adv-clip-max", "-1"], "--adv-clip-max must be a positive number, got -1.0"),
    ("ddpo.py", ["--timestep-fraction", "0"], "--timestep-fraction must be in (0, 1], got 0.0"),
    ("ddpo.py", ["--per-prompt-buffer", "0"], "--per-prompt-buffer must be at least 1, got 0"),
    ("ddpo.py", ["--timesteps-per-call", "3"], "--timesteps-per-call must be a divisor of the trained timesteps"),
    ("rwr.py", ["--beta", "-1"], "--beta must be at least 0 (0: uniform weights), got -1.0"),
    ("braid.py", ["--c", "-1"], "--c must be at least 0 (0: the non-conservative baseline), got -1.0"),
    ("braid.py", ["--kl-weight", "nan"], "--kl-weight must be at least 0, got nan"),
    ("braid.py", ["--offline-quantile", "0"], "--offline-quantile must be in (0, 1], got 0.0"),
    ("braid.py", ["--val-fraction", "1"], "--val-fraction must be in (0, 1), got 1.0"),
    ("braid.py", ["--eta", "0"], "--eta must be above 0 for BRAID"),
]


def expect_exit_2(script, args, message, monkeypatch, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, args, monkeypatch)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err, err
    assert err.count("error:") == 1 and "Traceback" not in err, err  # one sentence (progress bars aside)
    return err


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_values_of_shared_flags_end_in_one_sentence(script, tiny_sd_path, tmp_path, monkeypatch, capsys):
    base = ["--pretrained-model", tiny_sd_path, *TINY[script], "--output-dir", str(tmp_path)]
    for bad, message in SHARED_BAD:
        assert not os.listdir(tmp_path)  # refused before any run folder is made
        bad = [LENGTH[script] if flag is None else flag for flag in bad]
        expect_exit_2(script, [*base, *bad], message, monkeypatch, capsys)


@pytest.mark.parametrize("script, bad, message", METHOD_BAD)
def test_bad_values_of_method_flags_end_in_one_sentence(script, bad, message, tiny_sd_path, monkeypatch, capsys):
    expect_exit_2(script, ["--pretrained-model", tiny_sd_path, *TINY[script], *bad], message, monkeypatch, capsys)


def test_bad_prompt_files_and_output_folders(tiny_sd_path, tmp_path, monkeypatch, capsys):
    base = ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"]]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    expect_exit_2("draft_k.py", [*base, "--prompt-file", str(tmp_path / "latin1.txt")], "is not UTF-8", monkeypatch,
                  capsys)  # fmt: skip
    (tmp_path / "binary.txt").write_bytes(b"a cat\x00\x00\n")
    expect_exit_2(
        "draft_k.py", [*base, "--prompt-file", str(tmp_path / "binary.txt")], "NUL bytes", monkeypatch, capsys
    )
    (tmp_path / "a_file").write_text("")
    expect_exit_2("draft_k.py", [*base, "--output-dir", str(tmp_path / "a_file")], "cannot write the run folder",
                  monkeypatch, capsys)  # fmt: skip


def test_a_deterministic_last_step_is_refused_for_ddpo_and_braid(tiny_sd_path, tmp_path, monkeypatch, capsys):
    """set_alpha_to_one makes the last step's sigma 0: DDPO's log-prob and BRAID's KL are undefined there."""
    model = tmp_path / "alpha-one"  # the tiny model with another scheduler config
    model.mkdir()
    for part in os.listdir(tiny_sd_path):
        if part != "scheduler":
            os.symlink(os.path.join(tiny_sd_path, part), model / part)
    config = DDIMScheduler.load_config(tiny_sd_path, subfolder="scheduler")
    DDIMScheduler.from_config(config, set_alpha_to_one=True).save_pretrained(model / "scheduler")
    for script in ("ddpo.py", "braid.py"):
        err = expect_exit_2(script, ["--pretrained-model", str(model), *TINY[script], "--output-dir", str(tmp_path)],
                            "needs sigma > 0 at every DDIM", monkeypatch, capsys)  # fmt: skip
        assert "'set_alpha_to_one': True" in err


def test_two_runs_never_share_a_folder_and_a_folder_in_use_is_refused(tmp_path, capsys):
    first = common.checkpoint.open_run_dir(str(tmp_path), "reward__exp__1__1700000000", None, None, rank=0)
    second = common.checkpoint.open_run_dir(str(tmp_path), "reward__exp__1__1700000000", None, None, rank=0)
    assert os.path.basename(second) == "reward__exp__1__1700000000_2" and first != second  # same name, same second
    assert open(os.path.join(first, ".lock")).read() == str(os.getpid())  # held until this process ends
    checkpoint = os.path.join(first, "checkpoints", "step_000001")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(first, ".lock"), "w") as f:
            f.write(str(holder.pid))  # another live process resumed the run
        with pytest.raises(SystemExit) as exit_info:
            common.checkpoint.open_run_dir(str(tmp_path), "", checkpoint, {"step": 1}, rank=0)
        assert exit_info.value.code == 2 and f"is in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert common.checkpoint.open_run_dir(str(tmp_path), "", checkpoint, {"step": 1}, rank=0) == first  # stale lock


def test_resume_refuses_a_method_change_and_applies_a_new_learning_rate(tiny_sd_path, tmp_path, monkeypatch, capsys):
    args = ["--pretrained-model", tiny_sd_path, *TINY["ddpo.py"], "--output-dir", str(tmp_path), "--save-every", "1"]
    run_script("ddpo.py", [*args, "--num-epochs", "1"], monkeypatch)
    (run_dir,) = tmp_path.iterdir()
    resume = ["--resume", str(run_dir), "--num-epochs", "2"]
    for changed, old in [(["--reward", "jpeg_compressibility"], "jpeg_incompressibility"),
                         (["--estimator", "sf"], "is"), (["--lora-rank", "8"], "4"), (["--guidance-scale", "3"], "5.0"),
                         (["--seed", "2"], "1"),
                         (["--prompts", "shapes"], "simple_animals")]:  # fmt: skip
        err = expect_exit_2("ddpo.py", [*resume, *changed], f"was trained with {old}: resuming would mix two runs",
                            monkeypatch, capsys)  # fmt: skip
        assert f"error: {changed[0]} is " in err
    # no other flag: the run's own settings come back (its tiny model, sizes and reward), and it extends the run
    script_globals = run_script("ddpo.py", [*resume, "--learning-rate", "1e-2"], monkeypatch)
    assert "resuming with --learning-rate 0.01 (was 0.0003)" in capsys.readouterr().out
    assert script_globals["args"].pretrained_model == tiny_sd_path and script_globals["args"].resolution == 16
    assert [group["lr"] for group in script_globals["optimizer"].param_groups] == [1e-2]
    _, metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [1, 2]


def test_a_kill_while_writing_a_checkpoint_resumes_to_the_uninterrupted_run(tiny_sd_path, tmp_path, monkeypatch):
    """The process dies after the LoRA of checkpoint 4 is written and before its state.pt: resuming the run folder
    takes checkpoint 2, skips the incomplete one, and ends with the uninterrupted run's metrics and LoRA."""
    args = ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--save-every", "2", "--train-steps", "4"]
    once = run_script("draft_k.py", [*args, "--output-dir", str(tmp_path / "once")], monkeypatch)
    _, uninterrupted = read_metrics(tmp_path / "once")

    original_save = torch.save

    def save_or_die(obj, path, *a, **kw):
        if str(path).endswith(os.path.join("step_000004.tmp", "state.pt")):
            raise KeyboardInterrupt  # killed between the two writes
        return original_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", save_or_die)
    with pytest.raises(KeyboardInterrupt):
        run_script("draft_k.py", [*args, "--output-dir", str(tmp_path / "twice")], monkeypatch)
    monkeypatch.setattr(torch, "save", original_save)
    run_dir, _ = read_metrics(tmp_path / "twice")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_000002", "step_000004.tmp"]
    os.remove(os.path.join(run_dir, ".lock"))  # a killed process leaves its lock; a stale one is taken over anyway
    resumed = run_script("draft_k.py", [*args, "--resume", run_dir], monkeypatch)
    _, metrics = read_metrics(tmp_path / "twice")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-5
        )
    for a, b in zip(once["lora_params"], resumed["lora_params"]):
        torch.testing.assert_close(a, b)


def test_non_finite_or_corrupt_checkpoints_are_never_loaded(tiny_sd_path, tmp_path, monkeypatch, capsys):
    args = [
        "--pretrained-model",
        tiny_sd_path,
        *TINY["draft_k.py"],
        "--train-steps",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    run_script("draft_k.py", args, monkeypatch)
    (run_dir,) = tmp_path.iterdir()
    checkpoint = run_dir / "checkpoints" / "step_000001"
    lora_file = checkpoint / "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(lora_file)
    save_file({k: v * float("nan") for k, v in weights.items()}, lora_file)
    resume = [*args, "--train-steps", "2", "--resume", str(checkpoint)]
    expect_exit_2("draft_k.py", resume, "holds non-finite weights", monkeypatch, capsys)
    lora_file.write_bytes(b"\x00" * 10)  # truncated
    expect_exit_2("draft_k.py", resume, "cannot be read", monkeypatch, capsys)


def test_a_full_disk_while_saving_leaves_the_earlier_checkpoint(tiny_sd_path, tmp_path, monkeypatch, capsys):
    args = ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--train-steps", "2", "--save-every", "1"]
    original_save = torch.save

    def full_disk(obj, path, *a, **kw):
        if "step_000002" in str(path):
            raise OSError(28, "No space left on device")
        return original_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    expect_exit_2("draft_k.py", [*args, "--output-dir", str(tmp_path)], "No space left on device); the earlier",
                  monkeypatch, capsys)  # fmt: skip
    (run_dir,) = tmp_path.iterdir()
    assert os.listdir(run_dir / "checkpoints") == ["step_000001"]
    assert common.checkpoint.is_complete(str(run_dir / "checkpoints" / "step_000001"))


def test_out_of_memory_ends_in_one_sentence(tiny_sd_path, tmp_path):
    """A resolution whose latents alone need ~4 TB: the allocation fails at once, and the user reads which flags
    lower the memory, not a traceback."""
    result = subprocess.run(
        [sys.executable, "draft_k.py", "--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--resolution",
         str(2**20), "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: ran out of memory: lower the batch size" in result.stderr and "Traceback" not in result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / ".lock").exists()  # the lock is released on the way out


def test_a_torchrun_rank_that_stops_answering_does_not_hang_the_others(tmp_path):
    """Rank 1 stops (sleeps) before an all-reduce; rank 0 gives up after DIST_TIMEOUT_S with one sentence."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, time\nsys.path.insert(0, os.environ['ROOT'])\nimport torch, torch.distributed as dist\n"
        "import common\nfrom common.distributed import setup\nrank, _, _ = setup(False)\n"
        "if rank == 1:\n    time.sleep(60)\ndist.all_reduce(torch.ones(1))\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DIST_TIMEOUT_S": "3", "ROOT": ROOT})  # fmt: skip
    assert result.returncode != 0
    assert "error: another process of this torchrun job stopped answering" in result.stderr, result.stderr[-3000:]
