"""The run's lifecycle (common/run.py, common/checkpoint.py), the same in all six scripts: the shared blocks are the
same text everywhere; presets; atomic checkpoints and exact resumption; run folders and their locks; faults that
end a run (a diverging loss, a full disk, memory, a lost torchrun peer) in one sentence; bf16 on the CPU; prompts."""

import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import common.checkpoint
import common.models
import common.rewards
import common.run
from common.checkpoint import find_checkpoint, save_checkpoint, truncate_metrics
from common.cli import cli
from common.models import load_model
from common.prompts import PROMPT_SETS, geneval_metadata, load_prompts, sample_prompts, split_prompts, validation_prompt
from scripts import LENGTH, ROOT, SCRIPTS, TINY, definitions, read_metrics, run_script, run_subprocess

# the only differences allowed between the scripts' shared blocks: each names its method; DDPO and RWR count epochs,
# DRaFT asks for a reward with a gradient, BRAID names its run after its data's source, has no reward model of its
# own there, evaluates at its eta and names its learned reward; DDPO's checkpoints keep its per-prompt buffers; DDPO
# and RWR keep an EMA of the LoRA if asked (Flow-GRPO's recipe)
ALLOWED = [
    (r'Run\(args, "[^"]*", ', "Run(args, METHOD, "),
    (r", differentiable=True", ""),
    (r"start_epoch", "start_step"),
    (r'counter="epoch", end=args.num_epochs', 'counter="step", end=args.train_steps'),
    (r"name=data_source", "name=args.reward"),
    (r"\n    reward_fn = make_reward\(args.reward, run.device, run.dtype\)", ""),
    (
        r"run.start\(\n        (.*), eval_eta=args.eta, reward_name=reward_name, card_notes=notes\n    \)",
        r"run.start(\1)",
    ),
    (r', method_state=\{"prompt_buffers": tracker\}', ""),
    (r"\n    ema = EMA\(lora_params, args.ema_decay\) if args.ema_decay else None  # common/lora.py", ""),
    (r", ema=ema", ""),
    (r"run.start\(\n        (.*)\n    \)", r"run.start(\1)"),
]


def plumbing_blocks(script: str) -> list[str]:
    """Each `# TRY NOT TO MODIFY` block of a script (from its banner to the next blank line), and each line that
    carries the banner as a comment."""
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    blocks = re.findall(r"^ *# TRY NOT TO MODIFY.*?(?=\n\n|\Z)", text, flags=re.M | re.S)
    blocks += re.findall(r"^ *\S.*  # TRY NOT TO MODIFY.*$", text, flags=re.M)
    for pattern, replacement in ALLOWED:
        blocks = [re.sub(pattern, replacement, block) for block in blocks]
    return blocks


def test_the_plumbing_blocks_are_the_same_in_every_script():
    reference = plumbing_blocks("draft_k.py")
    assert len(reference) == 4 and "run = Run(" in reference[0] and "run.start(" in reference[1]
    assert "run.log(step, metrics)" in reference[2] and "run.finish()" in reference[3]
    for script in SCRIPTS:
        blocks = plumbing_blocks(script)
        blocks = [block.replace("epoch", "step") for block in blocks]
        assert blocks == reference, f"{script} differs from draft_k.py"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_tiny_preset_sets_its_values_and_flags_still_override_them(script, monkeypatch):
    script_globals = definitions(script)

    def parse(*argv):
        monkeypatch.setattr(sys, "argv", [script, *argv])
        return cli(script_globals["Args"], script_globals["PRESETS"])

    default, tiny = parse(), parse("--num-steps", "3", "--preset", "tiny")
    assert default.preset == "sd14" and default.pretrained_model == "CompVis/stable-diffusion-v1-4"
    assert default.resolution == 512 and default.num_steps == 50
    assert tiny.preset == "tiny" and tiny.pretrained_model == "assets/tiny-sd" and tiny.resolution == 32
    assert tiny.num_steps == 3  # the flag, not the preset's value
    assert parse("--preset=tiny").resolution == 32


@pytest.mark.slow
def test_help_opens_with_the_scripts_docstring_and_lists_the_choices():
    result = subprocess.run([sys.executable, "ddpo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "DDPO: Training Diffusion Models with Reinforcement Learning" in result.stdout
    assert (
        "--reward {aesthetic,pickscore,hpsv2,hpsv2.1,clipscore," in result.stdout
        and "prompt_following}|STR" in result.stdout
    )
    assert "--mixed-precision {auto,bf16,no}" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["draft_k.py", "braid.py"])
def test_a_run_prints_no_library_warning_and_releases_its_lock(script, tiny_sd_path, tmp_path):
    """`python script ...` as a user runs it: nothing on stderr but progress bars (no library warning, no note that
    an SD-sized model is slow on the CPU), and the run folder's lock is gone when the process ends."""
    stderr = run_subprocess(script, ["--pretrained-model", tiny_sd_path, *TINY[script], LENGTH[script], "1",
                                     "--output-dir", str(tmp_path)])  # fmt: skip
    assert "warn" not in stderr.lower() and "note:" not in stderr, stderr
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file() and not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_importing_common_changes_nothing_global():
    """Our hooks and filters (install_error_handling) are installed by cli, when a script starts; an import leaves the
    interpreter as it was (the libraries imported add filters of their own) and no library warns."""
    code = "import sys, logging, warnings; hook = sys.excepthook\n"
    code += "import common, common.models, common.run, common.rewards, common.sampling, common.offline_data\n"
    code += "assert sys.excepthook is hook and not logging.getLogger('transformers.utils.import_utils').filters\n"
    code += "assert not any(f[1] and 'local_dir_use_symlinks' in f[1].pattern for f in warnings.filters)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr, result.stderr


def state(step: int) -> dict:
    """The least a checkpoint's state.pt holds."""
    return {"step": step, "optimizer": {"state": {}, "param_groups": []}, "rng": torch.zeros(1, dtype=torch.uint8),
            "args": {}}  # fmt: skip


@pytest.fixture(scope="module")
def lora_model(tiny_sd_path):
    model = load_model(tiny_sd_path)
    model.add_lora(rank=2)
    return model


def test_a_checkpoint_is_written_whole_or_not_at_all(lora_model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(str(run / "checkpoints" / "step_000001"), lora_model, state(1))

    def killed(*args, **kwargs):  # the process dies after the LoRA is written, before state.pt
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(run / "checkpoints" / "step_000002"), lora_model, state(2))
    monkeypatch.undo()
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000001", "step_000002.tmp"]
    checkpoint_dir, found = find_checkpoint(str(run))  # the newest complete one
    assert checkpoint_dir.endswith("step_000001") and found["step"] == 1


def test_resume_skips_incomplete_and_unreadable_checkpoints_and_names_a_corrupt_one(lora_model, tmp_path, capsys):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(str(run / "checkpoints" / f"step_00000{step}"), lora_model, state(step))
    (run / "checkpoints" / "step_000003" / "state.pt").write_bytes(b"")  # truncated by a full disk
    os.remove(run / "checkpoints" / "step_000002" / "pytorch_lora_weights.safetensors")
    checkpoint_dir, found = find_checkpoint(str(run))
    assert checkpoint_dir.endswith("step_000001") and found["step"] == 1
    assert "skipping the unreadable checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # named explicitly: one sentence, no traceback
        find_checkpoint(str(run / "checkpoints" / "step_000003"))
    assert exit_info.value.code == 2 and "cannot be read" in capsys.readouterr().err


def test_truncate_metrics_keeps_what_the_checkpoint_had_logged_and_drops_a_torn_last_line(tmp_path, capsys):
    lines = "".join(f'{{"epoch": {i}, "loss": 0.5}}\n' for i in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(lines)
    truncate_metrics(str(tmp_path), "epoch", 3)
    assert (tmp_path / "metrics.jsonl").read_text() == lines[: lines.index('{"epoch": 4')]
    (tmp_path / "metrics.jsonl").write_text(lines + '{"epoch": 6, "lo')  # killed mid-write
    truncate_metrics(str(tmp_path), "epoch", 6)
    assert (tmp_path / "metrics.jsonl").read_text() == lines
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')  # damaged inside: refused
    with pytest.raises(SystemExit):
        truncate_metrics(str(tmp_path), "epoch", 2)
    assert "metrics.jsonl, line 2, is not JSON" in capsys.readouterr().err


def hold_lock(run_dir) -> subprocess.Popen:
    """Another process that takes `run_dir`'s lock and holds it until it is killed."""
    code = f"import sys, time; sys.path.insert(0, {ROOT!r}); from common.checkpoint import lock; lock({str(run_dir)!r})"
    holder = subprocess.Popen([sys.executable, "-c", code + "; print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow
def test_two_runs_never_share_a_folder_and_a_folder_in_use_is_refused(tmp_path, capsys):
    first = common.checkpoint.open_run_dir(str(tmp_path), "reward__exp__1__1700000000", None, None, rank=0)
    second = common.checkpoint.open_run_dir(str(tmp_path), "reward__exp__1__1700000000", None, None, rank=0)
    assert os.path.basename(second) == "reward__exp__1__1700000000_2" and first != second  # same name, same second
    pid, started = open(os.path.join(first, ".lock")).read().split()  # held until this process ends
    assert int(pid) == os.getpid() and started == common.checkpoint.process_start(os.getpid())
    third = tmp_path / "third"
    checkpoint = str(third / "checkpoints" / "step_000001")
    (third / "samples").mkdir(parents=True)
    holder = hold_lock(third)  # another live process resumed that run
    try:
        with pytest.raises(SystemExit) as exit_info:
            common.checkpoint.open_run_dir(str(tmp_path), "", checkpoint, {"step": 1}, rank=0)
        assert exit_info.value.code == 2 and f"is in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()  # killed: the OS releases its lock, though its file still names it
        holder.wait()
    assert open(third / ".lock").read().split()[0] == str(holder.pid)
    assert common.checkpoint.open_run_dir(str(tmp_path), "", checkpoint, {"step": 1}, rank=0) == str(third)


@pytest.mark.slow
def test_processes_started_at_the_same_instant_cannot_both_take_a_run_folder(tmp_path):
    """Four processes contest 12 run folders, one at a time, each contest starting at the same instant for all: in
    every one exactly one takes the folder (the earlier read-then-write lock let 2 to 4 take each, measured here)."""
    rounds, start = 12, time.time() + 10  # time for all of them to start and import
    for r in range(rounds):
        (tmp_path / str(r)).mkdir()
    code = f"""import sys, time; sys.path.insert(0, {ROOT!r}); from common.checkpoint import lock
for r in range({rounds}):
    while time.time() < {start} + 0.25 * r:
        pass
    try:
        lock({str(tmp_path)!r} + "/" + str(r))
        print("took", r, flush=True)
    except SystemExit:
        pass
time.sleep(3)  # every lock held until all contests are over
"""
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = [subprocess.Popen([sys.executable, "-c", code], **pipes) for _ in range(4)]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [sum(f"took {r}\n" in out for out in outputs) for r in range(rounds)] == [1] * rounds


def expect_exit_2(script, args, message, monkeypatch, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, args, monkeypatch)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("error:") == 1, err
    return err


def test_resume_refuses_a_method_change_or_another_script_and_applies_a_new_lr(tiny_sd_path, tmp_path, monkeypatch,
                                                                               capsys):  # fmt: skip
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
    expect_exit_2("rwr.py", resume, "is a checkpoint of ddpo.py, not of rwr.py: resume it with python ddpo.py",
                  monkeypatch, capsys)  # fmt: skip
    # no other flag: the run's own settings come back (its tiny model, sizes and reward), and it extends the run
    script_globals = run_script("ddpo.py", [*resume, "--learning-rate", "1e-2"], monkeypatch)
    assert "resuming with --learning-rate 0.01 (was 0.0003)" in capsys.readouterr().out
    assert script_globals["args"].pretrained_model == tiny_sd_path and script_globals["args"].resolution == 16
    assert [group["lr"] for group in script_globals["optimizer"].param_groups] == [1e-2]
    _, metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [1, 2]


@pytest.mark.slow
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
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["eval_reward_mean"] == pytest.approx(b["eval_reward_mean"], rel=1e-6)  # logged as if never stopped
        assert a["eval_kl"] == pytest.approx(b["eval_kl"], rel=1e-5, abs=1e-9)
    for a, b in zip(once["lora_params"], resumed["lora_params"]):
        torch.testing.assert_close(a, b)


def test_non_finite_or_corrupt_checkpoints_are_never_loaded(tiny_sd_path, tmp_path, monkeypatch, capsys):
    args = ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--train-steps", "1", "--output-dir",
            str(tmp_path)]  # fmt: skip
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


def test_a_diverging_run_stops_before_overwriting_the_lora(tiny_sd_path, tmp_path, monkeypatch, capsys):
    """The reward turns NaN at the third training step (as a diverged model's would): the run stops there, before
    the optimizer step, and writes no LoRA."""
    make_reward, calls = common.rewards.make_reward, []

    def diverging_reward(*args, **kwargs):
        reward_fn = make_reward(*args, **kwargs)

        def reward(images, prompts):
            calls.append(torch.is_grad_enabled())
            return reward_fn(images, prompts) * (float("nan") if sum(calls) >= 3 else 1.0)

        return reward

    monkeypatch.setattr(common.rewards, "make_reward", diverging_reward)
    args = ["--train-steps", "5", "--save-every", "1", "--output-dir", str(tmp_path)]
    expect_exit_2("draft_k.py", ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], *args],
                  "stopped before the LoRA was overwritten", monkeypatch, capsys)  # fmt: skip
    run_dir, metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and not os.path.exists(os.path.join(run_dir, "pytorch_lora_weights.safetensors"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_000001", "step_000002"]


@pytest.mark.slow
def test_out_of_memory_ends_in_one_sentence(tiny_sd_path, tmp_path):
    """The GPU's allocator gives up in the first denoiser call (torch.OutOfMemoryError, raised here by a stand-in:
    a real allocation that large can be granted by the CPU's overcommit and end in the kernel's OOM killer instead):
    the user reads which flags lower the memory, not a traceback."""
    code = ("import runpy, sys, torch, common.families.sd\n"
            "def full(*args, **kwargs):\n    raise torch.OutOfMemoryError('CUDA out of memory')\n"
            "common.families.sd.StableDiffusion.denoise = full\nsys.argv = ['draft_k.py'] + sys.argv[1:]\n"
            "runpy.run_path('draft_k.py', run_name='__main__')\n")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code, "--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--output-dir",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: ran out of memory: lower the batch size" in result.stderr and "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)  # a run that never took a step leaves no folder (nor its lock) behind


@pytest.mark.slow
def test_a_torchrun_rank_that_stops_answering_does_not_hang_the_others(tmp_path):
    """Rank 1 stops (sleeps) before an all-reduce; rank 0 gives up after DIST_TIMEOUT_S with one sentence."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, time\nsys.path.insert(0, os.environ['ROOT'])\nimport torch, torch.distributed as dist\n"
        "from common.cli import install_error_handling\nfrom common.distributed import setup\n"
        "install_error_handling()\n"
        "rank, _, _ = setup(False)\nif rank == 1:\n    time.sleep(60)\ndist.all_reduce(torch.ones(1))\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DIST_TIMEOUT_S": "3", "ROOT": ROOT})  # fmt: skip
    assert result.returncode != 0
    assert "error: another process of this torchrun job stopped answering" in result.stderr, result.stderr[-3000:]


# one or two updates each: enough to run every cast of a training step and of the evaluation
BF16 = {
    "draft_full.py": ["--train-steps", "2"],
    "draft_k.py": ["--train-steps", "2", "--k", "2"],
    "draft_lv.py": ["--train-steps", "2"],
    "ddpo.py": ["--num-epochs", "1"],
    "rwr.py": ["--num-epochs", "1"],
    "braid.py": ["--train-steps", "2", "--k", "2", "--offline-size", "12", "--reward-model-steps", "5"],
}


@pytest.mark.parametrize("script", [s if s in ("draft_k.py", "ddpo.py") else pytest.param(s, marks=pytest.mark.slow)
                                    for s in BF16])  # fmt: skip
def test_bf16_on_the_cpu_trains_an_fp32_lora_on_bf16_frozen_weights(
    script, tiny_sd_path, tmp_path, monkeypatch, capsys
):
    """`--mixed-precision bf16` on the CPU: the dtype path every GPU run takes by default (frozen denoiser, VAE and
    text encoder in bf16, the LoRA and its optimiser in fp32, the sampler's arithmetic and the rewards in fp32). On
    a CPU without bf16 matrix instructions the run says, once, that it will be slow there."""
    initial_lora, add_lora = [], common.models.Model.add_lora

    def recording_add_lora(*args, **kwargs):
        params = add_lora(*args, **kwargs)
        initial_lora.extend(p.detach().clone() for p in params)
        return params

    monkeypatch.setattr(common.models.Model, "add_lora", recording_add_lora)
    args = ["--pretrained-model", tiny_sd_path, *TINY[script], *BF16[script], "--mixed-precision", "bf16",
            "--output-dir", str(tmp_path)]  # fmt: skip
    script_globals = run_script(script, args, monkeypatch)
    _, metrics = read_metrics(tmp_path)
    assert metrics and all(math.isfinite(v) for m in metrics for v in m.values() if v is not None), metrics
    model, lora_params = script_globals["model"], script_globals["lora_params"]
    for module in (model.denoiser, model.vae, *model.text_encoders):
        frozen_dtypes = {p.dtype for p in module.parameters() if not p.requires_grad}
        assert frozen_dtypes == {torch.bfloat16}, (type(module).__name__, frozen_dtypes)
    assert {p.dtype for p in lora_params} == {torch.float32}
    assert len(initial_lora) == len(lora_params)
    assert all(not torch.equal(before, after) for before, after in zip(initial_lora, lora_params))  # every one moved
    assert capsys.readouterr().out.count("note: this CPU has no bf16 matrix instructions") == int(
        not common.run.cpu_has_bf16()
    )


def test_prompt_sets_files_splits_and_seeded_draws(tmp_path):
    animals = load_prompts("simple_animals")
    assert len(animals) == 45 == len(set(animals)) and animals[:3] == ["cat", "dog", "horse"]
    activities = load_prompts("nouns_activities")
    assert len(activities) == 45 * 3
    assert "an ant washing the dishes" in activities and "a cat playing chess" in activities
    shapes = load_prompts("shapes")
    assert len(shapes) == len(set(shapes)) == 3 * 6 * 5  # shapes x shape colours x other background colours
    assert "a red circle on a white background" in shapes and "a red square on a red background" not in shapes
    geneval, metadata = load_prompts("geneval"), geneval_metadata()  # GenEval's file, as its repository has it
    assert len(geneval) == len(set(geneval)) == 553 and geneval == [record["prompt"] for record in metadata]
    tags = {tag: sum(r["tag"] == tag for r in metadata) for tag in {r["tag"] for r in metadata}}
    assert tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                    "color_attr": 100}  # fmt: skip
    assert metadata[0] == {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
                           "prompt": "a photo of a bench"}  # fmt: skip
    assert validation_prompt("geneval") == geneval  # also a held-out set by its name
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\n\n  a blue whale  \n")
    assert load_prompts(prompt_file=str(path)) == ["a red fox", "a blue whale"]
    train, held_out = split_prompts(shapes)
    assert len(held_out) == 4 and not set(train) & set(held_out) and len(train) == 86
    assert [shapes.index(p) for p in held_out] == [11, 34, 56, 79]  # spread through the set
    assert split_prompts(["a", "b"]) == (["a", "b"], ["a", "b"])  # too few to hold out: used for both
    first = sample_prompts(animals, 8, torch.Generator().manual_seed(0))
    assert first == sample_prompts(animals, 8, torch.Generator().manual_seed(0))
    assert first != sample_prompts(animals, 8, torch.Generator().manual_seed(1)) and set(first) <= set(animals)
    assert PROMPT_SETS["shapes"] == shapes


def test_the_model_card_parses_and_its_snippet_loads_the_lora(tiny_sd_path, tmp_path, monkeypatch, capsys):
    """Every run folder gets a README.md in the Hub's model-card format: the YAML header a Hub page reads, the last
    grid, the held-out reward before and after, the command, and a snippet that loads the LoRA with plain diffusers."""
    from huggingface_hub import ModelCard
    from PIL import Image

    run_script("draft_k.py", ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--train-steps", "2",
                              "--output-dir", str(tmp_path)], monkeypatch)  # fmt: skip
    out = capsys.readouterr().out
    (run_dir,) = tmp_path.iterdir()
    card = ModelCard.load(run_dir / "README.md")
    assert card.data.base_model == tiny_sd_path and card.data.library_name == "diffusers"
    assert {"lora", "text-to-image", "draft_k", "colorfulness", "stable-diffusion"} <= set(card.data.tags)
    assert "![fixed-seed samples" in card.text and (run_dir / "samples" / "step_000002.png").is_file()
    assert "| pretrained (step 0) |" in card.text and "| fine-tuned (step 2) |" in card.text
    snippet = card.text.split("```python")[1].split("```")[0]
    scope = {}
    exec(snippet, scope)  # as a user would paste it
    assert isinstance(scope["image"], Image.Image) and "lora" in str(scope["pipeline"].unet.peft_config)
    for line in ("held-out colorfulness:", "LoRA: ", "model card: ", "last checkpoint: "):
        assert line in out


def test_push_to_hub_offline_is_refused_before_training(tiny_sd_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the tests run offline anyway
    expect_exit_2("draft_k.py", ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--push-to-hub",
                                 "--output-dir", str(tmp_path)], "--push-to-hub cannot upload with HF_HUB_OFFLINE=1",
                  monkeypatch, capsys)  # fmt: skip
    assert not os.listdir(tmp_path)


def test_validation_prompts_make_the_grid_and_keep_every_training_prompt(tiny_sd_path, tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "more.txt").write_text("a white square on a black background\n")
    script_globals = run_script("draft_k.py", [
        "--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--prompts", "shapes", "--train-steps", "1",
        "--validation-prompts", "a red circle on a blue background", str(tmp_path / "more.txt"),
        "--output-dir", str(tmp_path / "runs"),
    ], monkeypatch)  # fmt: skip
    assert script_globals["train_prompts"] == PROMPT_SETS["shapes"]  # none held out
    assert script_globals["eval_prompts"] == [
        "a red circle on a blue background",
        "a white square on a black background",
    ]
    (run_dir,) = (tmp_path / "runs").iterdir()
    grid = Image.open(run_dir / "samples" / "step_000000.png")
    assert grid.size == (2 * 16, 2 * 16)  # a column per validation prompt, two seeds each
    (metrics,) = read_metrics(tmp_path / "runs")[1]  # the tiny models' world: how many samples show their prompt
    assert metrics["eval_fidelity"] in (0, 0.25, 0.5, 0.75, 1), metrics
