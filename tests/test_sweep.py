"""A hostile user's sweep, kept as tests so that each class of defect stays fixed: what must not be lost (a refused
resume's history), what must not be silently wrong (a duplicated reward term, a mistyped file name, a flag that does
nothing, a data set's own prompts), what must not end in a traceback or with the wrong cause (damaged model folders,
a user's reward that raises or returns nonsense, damaged data, tampered checkpoints, signals), and what a newcomer
meets first (the run's name and card, --help, the preset from another folder)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from common.rewards import Colorfulness, make_reward
from scripts import ROOT, TINY, read_metrics, run_script

DRAFT = ["--reward", "colorfulness", "--resolution", "16", "--num-steps", "4", "--batch-size", "2"]
REWARDS = """
import sys
import torch

def exits(images, prompts):
    return images.mean(dim=(1, 2, 3))

calls = []

def nan_reward(images, prompts):
    return images.mean(dim=(1, 2, 3)) * float("nan")

def raises_later(images, prompts):
    calls.append(1)
    if len(calls) > 2:  # the contract check and the first evaluation pass
        raise ValueError("the scorer lost its model")
    return images.mean(dim=(1, 2, 3))

def wrong_count_later(images, prompts):
    calls.append(1)
    values = images.mean(dim=(1, 2, 3))
    return values if len(calls) <= 2 else values[:1]

def claims_a_gradient(images, prompts):
    return images.detach().mean(dim=(1, 2, 3))

claims_a_gradient.differentiable = True
"""


def expect_exit_2(script, args, message, monkeypatch, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, args, monkeypatch)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("error:") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# nothing lost, nothing silently wrong


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tiny_sd_path, tmp_path, monkeypatch, capsys):
    run_script("draft_k.py", ["--pretrained-model", tiny_sd_path, *DRAFT, "--train-steps", "3", "--save-every", "1",
                              "--output-dir", str(tmp_path)], monkeypatch)  # fmt: skip
    run_dir, _ = read_metrics(tmp_path)
    history = open(os.path.join(run_dir, "metrics.jsonl")).read()
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000001")
    with open(os.path.join(checkpoint, "pytorch_lora_weights.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    expect_exit_2("draft_k.py", ["--resume", checkpoint], "cannot be read", monkeypatch, capsys)
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == history  # the three steps are all still there


def test_a_reward_term_given_twice_counts_twice():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    once = Colorfulness()(images)
    torch.testing.assert_close(make_reward("colorfulness+colorfulness")(images), 2 * once)
    torch.testing.assert_close(make_reward("0.5*colorfulness+colorfulness")(images), 1.5 * once)


@pytest.mark.parametrize("flags, message", [
    (["--validation-prompts", "missing.txt"], "--validation-prompts 'missing.txt' reads like a file's path, but no"),
    (["--validation-prompts", "prompts/held_out"], "reads like a file's path, but no such file exists"),
    (["--validation-prompts", ""], "--validation-prompts has an empty value"),
    (["--validation-prompts", "."], "--validation-prompts names the folder '.'"),
    (["--hub-model-id", "me/my-lora"], "--hub-model-id names where --push-to-hub uploads, and --push-to-hub is not"),
    (["--output-dir", ""], "--output-dir must be a folder's path, not empty"),
    (["--reward", "examples/redness_reward.py"], "needs the name of its class or function after a colon"),
    (["--reward", "colorfulness+nan*colorfulness"], "the reward weight nan in 'colorfulness+nan*colorfulness' must be"),
    (["--reward", "colorfulness+inf*colorfulness"], "must be a finite number of size at most 1e6"),
    (["--reward", "1e300*colorfulness"], "the reward weight 1e300 in '1e300*colorfulness' must be a finite number"),
    (["--reward", "aesthetic:/no/such/folder"], "names the folder '/no/such/folder' for its models, which does not"),
    (["--reward", "colorfulness+"], "the reward 'colorfulness+' has an empty term"),
    (["--cpu-threads", "0"], "--cpu-threads must be at least 1, got 0"),
    (["--cpu-threads", "-3"], "--cpu-threads must be at least 1, got -3"),
])  # fmt: skip
def test_a_value_that_would_be_silently_wrong_is_refused(flags, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    output = [] if flags[0] == "--output-dir" else ["--output-dir", str(out)]
    expect_exit_2("draft_k.py", ["--pretrained-model", tiny_sd_path, *DRAFT, *output, *flags], message, monkeypatch,
                  capsys)  # fmt: skip
    assert not out.exists() or not os.listdir(out)


@pytest.mark.parametrize("name, message", [
    ("exits", "the reward file '{}' called sys.exit(0) while being imported"),
    ("nan_reward", "the reward '{}:nan_reward' returned nan for an image: every reward must be a finite number"),
    ("claims_a_gradient", "says it is differentiable, but its value carries no gradient back to the images"),
])  # fmt: skip
def test_a_users_reward_that_misbehaves_at_the_start_is_named(name, message, reward_file, tiny_sd_path, tmp_path,
                                                               monkeypatch, capsys):  # fmt: skip
    if name == "exits":
        with open(reward_file, "a") as f:
            f.write("\nsys.exit(0)\n")
    args = ["--pretrained-model", tiny_sd_path, *DRAFT, "--reward", f"{reward_file}:{name}", "--output-dir",
            str(tmp_path / "out")]  # fmt: skip
    expect_exit_2("draft_k.py", args, message.format(reward_file), monkeypatch, capsys)


@pytest.mark.parametrize("name, message", [
    ("raises_later", "raised ValueError at {}, line 16 (the scorer lost its model); the traceback is in"),
    ("wrong_count_later", "must return a float tensor (B,) for images (B, 3, H, W), got torch.float32 of shape (1,)"),
])  # fmt: skip
def test_a_users_reward_that_fails_mid_run_is_named_with_its_line(name, message, reward_file, tiny_sd_path, tmp_path,
                                                                   monkeypatch, capsys):  # fmt: skip
    args = ["--pretrained-model", tiny_sd_path, *EPOCHS_TINY, "--reward", f"{reward_file}:{name}", "--num-epochs", "2",
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    expect_exit_2("ddpo.py", args, message.format(reward_file), monkeypatch, capsys)
    if name == "raises_later":
        (run,) = os.listdir(tmp_path / "out")
        log = (tmp_path / "out" / run / "error.log").read_text()
        assert "Traceback" in log and "the scorer lost its model" in log


EPOCHS_TINY = TINY["ddpo.py"][2:]  # without --reward


@pytest.mark.parametrize("path, message", [
    ("", "--offline-data is empty: give a folder of images"),  # it synthesised data, as if the flag were not given
    ("/no/such/data.pt", "--offline-data /no/such/data.pt does not exist"),
])  # fmt: skip
def test_braid_refuses_offline_data_that_is_not_there(path, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    args = [
        "--pretrained-model",
        tiny_sd_path,
        *TINY["braid.py"],
        "--offline-data",
        path,
        "--output-dir",
        str(tmp_path),
    ]
    expect_exit_2("braid.py", args, message, monkeypatch, capsys)
    assert not os.listdir(tmp_path)


def test_braid_trains_on_the_prompts_of_a_users_data(tiny_sd_path, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    prompts = ["a red circle", "a blue square", "a green triangle", "a white circle", "a black square"]
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(12):
            Image.new("RGB", (8, 8), (20 * i, 100, 0)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "reward": i, "prompt": prompts[i % 5]}) + "\n")
    args = ["--pretrained-model", tiny_sd_path, *TINY["braid.py"], "--offline-data", str(folder), "--train-steps", "1",
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    script = run_script("braid.py", args, monkeypatch)
    assert f"fine-tuning on the 5 prompts of {folder}, not on --prompts" in capsys.readouterr().out
    assert set(script["train_prompts"]) | set(script["eval_prompts"]) == set(prompts)


# ----------------------------------------------------------------------------------------------------------------------
# no traceback: damaged models, data and checkpoints


def damaged_copy(path, tmp_path, damage) -> str:
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    damage(copy)
    return str(copy)


def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def other_widths(model):
    """A UNet config that does not fit its weights."""
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [16, 32]}))


def pickled_weights(model):
    """The UNet's weights as a pickle (a .bin), which the loader refuses to unpickle beyond tensors."""
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": torch.nn.Linear(1, 1)}, model / "unet" / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize("damage, message", [
    (lambda m: truncate(m / "unet" / "diffusion_pytorch_model.safetensors"), "(subfolder 'unet'): a part is missing"),
    (other_widths, "could not load the local '{}' (subfolder 'unet')"),
    (pickled_weights, "could not load the local '{}' (subfolder 'unet')"),
])  # fmt: skip
def test_a_damaged_model_folder_ends_in_one_sentence(damage, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    model = damaged_copy(tiny_sd_path, tmp_path, damage)
    args = ["--pretrained-model", model, *DRAFT, "--output-dir", str(tmp_path / "out")]
    expect_exit_2("draft_k.py", args, message.format(model), monkeypatch, capsys)


def test_an_sd3_folder_without_its_t5_tokenizer_is_refused(tiny_sd3_path, tmp_path, monkeypatch, capsys):
    model = damaged_copy(tiny_sd3_path, tmp_path, lambda m: shutil.rmtree(m / "tokenizer_3"))
    expect_exit_2("draft_k.py", ["--pretrained-model", model, *DRAFT, "--output-dir", str(tmp_path / "out")],
                  "has no 'tokenizer_3' folder, which its model_index.json names", monkeypatch, capsys)  # fmt: skip


def bomb(folder):
    """An image whose size (15000 x 15000 pixels) PIL refuses to decode, in a few kB."""
    Image.new("1", (15000, 15000)).save(folder / "0.png")


@pytest.mark.parametrize("make, message", [
    (bomb, "cannot read the image '0.png' (Image size (225000000 pixels) exceeds limit"),
    (lambda folder: None, "cannot read the image 'a\\x00b.png' (embedded null byte)"),
])  # fmt: skip
def test_images_no_one_can_read_end_in_one_sentence(make, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(folder / f"{i}.png")
    make(folder)
    first = '{"file_name": "a\\u0000b.png", "reward": 0}' if make is not bomb else '{"file_name": "0.png", "reward": 0}'
    lines = [first] + [json.dumps({"file_name": f"{i}.png", "reward": i}) for i in range(1, 12)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--pretrained-model", tiny_sd_path, *TINY["braid.py"], "--offline-data", str(folder), "--output-dir",
            str(tmp_path / "out")]  # fmt: skip
    expect_exit_2("braid.py", args, message, monkeypatch, capsys)


@pytest.mark.slow
def test_a_pt_data_sets_images_are_read_at_the_resolution(tiny_sd_path, tmp_path, monkeypatch):
    """1 px images and 24 px images both become --resolution images, as a folder's are."""
    scores = torch.arange(12.0)
    for size in (1, 24):
        images = (torch.rand(12, 3, size, size, generator=torch.Generator().manual_seed(size)) * 255).byte()
        torch.save({"images": images, "scores": scores}, tmp_path / f"{size}.pt")
        args = ["--pretrained-model", tiny_sd_path, *TINY["braid.py"], "--offline-data", str(tmp_path / f"{size}.pt"),
                "--train-steps", "1", "--output-dir", str(tmp_path / f"out{size}")]  # fmt: skip
        run_script("braid.py", args, monkeypatch)
        assert read_metrics(tmp_path / f"out{size}")[1][0]["step"] == 1


@pytest.mark.slow
def test_braid_resumed_without_its_synthesised_data_names_the_file(tiny_sd_path, tmp_path, monkeypatch, capsys):
    args = ["--pretrained-model", tiny_sd_path, *TINY["braid.py"], "--train-steps", "1", "--output-dir", str(tmp_path)]
    run_script("braid.py", args, monkeypatch)
    run_dir, _ = read_metrics(tmp_path)
    os.remove(os.path.join(run_dir, "offline_data.pt"))
    message = f"the resumed run's offline data {run_dir}/offline_data.pt is missing"
    expect_exit_2("braid.py", ["--resume", run_dir, "--train-steps", "2"], message, monkeypatch, capsys)


@pytest.mark.parametrize("tamper, message", [
    (lambda s: {**s, "rng": "seed"}, "its 'rng' is a str, not a uint8 tensor"),
    pytest.param(lambda s: {**s, "step": "1"}, "its 'step' is a str, not a count", marks=pytest.mark.slow),
    pytest.param(lambda s: {**s, "optimizer": [1, 2]}, "its 'optimizer' is a list, not an optimizer's state_dict",
                 marks=pytest.mark.slow),
    pytest.param(lambda s: {**s, "optimizer": {"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}]}},
                 "does not fit this run", marks=pytest.mark.slow),
])  # fmt: skip
def test_a_tampered_checkpoint_is_refused(tamper, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    run_script("draft_k.py", ["--pretrained-model", tiny_sd_path, *DRAFT, "--train-steps", "1", "--output-dir",
                              str(tmp_path)], monkeypatch)  # fmt: skip
    run_dir, _ = read_metrics(tmp_path)
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000001")
    state = torch.load(os.path.join(checkpoint, "state.pt"), weights_only=True)
    torch.save(tamper(state), os.path.join(checkpoint, "state.pt"))
    expect_exit_2("draft_k.py", ["--resume", checkpoint, "--train-steps", "2"], message, monkeypatch, capsys)


# ----------------------------------------------------------------------------------------------------------------------
# signals, and what a newcomer meets first


def start(tmp_path, *extra) -> subprocess.Popen:
    args = ["draft_k.py", "--preset", "tiny", "--train-steps", "10000", "--save-every", "1", "--output-dir",
            str(tmp_path), *extra]  # fmt: skip
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_a_run_as_ctrl_c_does(signum, tmp_path):
    process = start(tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("*/checkpoints/step_000002")):
        time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err[-2000:]
    (run_dir,) = tmp_path.iterdir()
    stopped = f"stopped by {signal.Signals(signum).name}; the last checkpoint is {run_dir}/checkpoints/"
    assert stopped in err and "Traceback" not in err and not (run_dir / ".lock").exists(), err[-2000:]
    assert "reward=" in err and "loss=" in err  # the progress bar shows the step's numbers


@pytest.mark.slow
def test_ctrl_c_while_the_libraries_load_ends_in_one_line(tmp_path):
    process = start(tmp_path)
    time.sleep(0.3)  # torch is still being imported
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip() == "interrupted before the run started; nothing was written"


@pytest.mark.slow
def test_an_error_mid_run_starts_its_own_line_below_the_progress_bar(reward_file, tiny_sd_path, tmp_path):
    args = ["ddpo.py", "--pretrained-model", tiny_sd_path, *EPOCHS_TINY, "--reward", f"{reward_file}:raises_later",
            "--num-epochs", "2", "--output-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "\nerror: the reward" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_a_first_step_that_runs_out_of_memory_leaves_no_folder(tiny_sd_path, tmp_path):
    """The first evaluation passes and writes its grid; the first optimizer step runs out of memory (a stand-in
    raises torch's error there): the folder of a run that logged nothing is removed."""
    code = "import runpy, sys, torch\n"
    code += "def full(*args, **kwargs):\n    raise torch.OutOfMemoryError('CUDA out of memory')\n"
    code += "torch.optim.AdamW.step = full\nsys.argv = ['draft_k.py'] + sys.argv[1:]\n"
    code += "runpy.run_path('draft_k.py', run_name='__main__')\n"
    args = ["--pretrained-model", tiny_sd_path, *DRAFT, "--output-dir", str(tmp_path)]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "error: ran out of memory" in result.stderr, result.stderr[-2000:]
    assert not os.listdir(tmp_path)


def test_a_weighted_sum_names_its_run_after_every_term_and_a_resumed_card_keeps_both_commands(tiny_sd_path, tmp_path,
                                                                                              monkeypatch):  # fmt: skip
    reward = "colorfulness+examples/redness_reward.py:redness"
    args = ["--pretrained-model", tiny_sd_path, *DRAFT, "--reward", reward, "--train-steps", "1", "--output-dir",
            str(tmp_path)]  # fmt: skip
    run_script("draft_k.py", args, monkeypatch)
    run_dir, _ = read_metrics(tmp_path)
    assert os.path.basename(run_dir).startswith("colorfulness+redness_reward.py_redness__draft_k__1__")
    run_script("draft_k.py", ["--resume", run_dir, "--train-steps", "2"], monkeypatch)
    card = open(os.path.join(run_dir, "README.md")).read()
    first = f"python draft_k.py --pretrained-model {os.path.relpath(tiny_sd_path, run_dir)}"
    assert first in card and "python draft_k.py --resume . --train-steps 2" in card and ROOT not in card, card
    assert "The first command started the run and each later one resumed it" in card


@pytest.mark.slow
def test_the_tiny_preset_runs_from_another_folder_and_help_says_what_it_sets(tmp_path):
    script = os.path.join(ROOT, "draft_k.py")
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
    assert "--preset tiny sets: --pretrained-model assets/tiny-sd --cpu-threads 1" in help_text
    result = subprocess.run([sys.executable, script, "--preset", "tiny", "--train-steps", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (next((tmp_path / "runs").iterdir()) / "pytorch_lora_weights.safetensors").is_file()


def test_a_rewards_own_models_from_a_local_folder(tiny_clip_path, aesthetic_head_path, tmp_path):
    folder = tmp_path / "aesthetic"
    shutil.copytree(tiny_clip_path, folder)
    shutil.copy(aesthetic_head_path, folder / "aesthetic-model.pth")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from common.reward_models import Aesthetic

    expected = Aesthetic(clip_model=tiny_clip_path, head=aesthetic_head_path).eval()(images)
    torch.testing.assert_close(make_reward(f"aesthetic:{folder}")(images), expected)
