"""Every mistake a user can make on the command line or in a file ends before the run starts, with one sentence that
names the cause, exit status 2, no traceback and no run folder left behind."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from scripts import LENGTH, ROOT, SCRIPTS, TINY, run_script

# flags every script shares: (arguments, a fragment of the sentence); None stands for --train-steps or --num-epochs
SHARED_BAD = [
    (["--learning-rate", "-1e-3"], "--learning-rate must be in (0, 1], got -0.001"),
    (["--learning-rate", "nan"], "--learning-rate must be in (0, 1], got nan"),
    (["--learning-rate", "1e30"], "--learning-rate must be in (0, 1], got 1e+30"),
    (["--learning-rate", "fast"], "--learning-rate: could not convert string to float: 'fast' (see --help)"),
    (["--weight-decay", "-1"], "--weight-decay must be at least 0, got -1.0"),
    (["--lora-rank", "0"], "--lora-rank must be between 1 and 1024, got 0"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
    (["--seed", str(2**40)], "--seed must be between 0 and 2**32 - 1"),
    (["--save-every", "0"], "--save-every must be at least 1, got 0"),
    (["--sample-every", "0"], "--sample-every must be at least 1, got 0"),
    (["--eta", "2"], "--eta must be between 0 and 1, got 2.0"),
    (["--eta", "-1"], "--eta must be"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a positive number, got -1.0"),
    (["--guidance-scale", "-1"], "--guidance-scale must be at least 1 (1: no guidance), got -1.0"),
    (["--exp-name", "../../x"], "--exp-name must be 1 to 100 letters, digits, _ . + -, got '../../x'"),
    (["--exp-name", "x" * 300], "--exp-name must be 1 to 100 letters, digits, _ . + -, got 'xxx"),
    (["--lora-rank", "100000000"], "--lora-rank must be between 1 and 1024, got 100000000"),
    (["--resolution", "1048576"], "--resolution must be between 1 and 16384, got 1048576"),
    (["--resume", ""], "--resume needs a run folder (runs/...) or one of its checkpoint folders, got an empty path"),
    (["--prompts", "birds"], "invalid choice 'birds' for argument '--prompts'. Expected one of ('simple_animals',"),
    (["--mixed-precision", "fp16"], "invalid choice 'fp16' for argument '--mixed-precision'"),
    (["--no-such-flag", "1"], "Unrecognized options: --no-such-flag, 1 (see --help)"),
    ([None, "0"], "must be between 1 and 1000000, got 0"),
    ([None, "-3"], "must be between 1 and 1000000, got -3"),
    (["--resolution", "17"], "--resolution must be a positive multiple of 2 (the VAE's downsampling), got 17"),
    (["--num-steps", "1001"], "--num-steps must be at most the scheduler's 1000 training timesteps, got 1001"),
    (["--pretrained-model", "/no/such/model"], "could not load '/no/such/model'"),
    (["--resume", "/no/such/run"], "--resume /no/such/run is neither a checkpoint folder nor"),
]
# a script's own flags: (script, arguments, a fragment of the sentence)
METHOD_BAD = [
    ("draft_k.py", ["--k", "0"], "--k must be between 1 and --num-steps (4), got 0"),
    ("draft_k.py", ["--k", "5"], "--k must be between 1 and --num-steps (4), got 5"),
    ("draft_k.py", ["--k-min", "0"], "--k-min must be between 1 and --k (1), got 0"),
    ("draft_k.py", ["--k", "2", "--k-min", "3"], "--k-min must be between 1 and --k (2), got 3"),
    (
        "draft_k.py",
        ["--reward", "jpeg_compressibility"],
        "backpropagates through the reward and 'jpeg_compressibility' is not differentiable",
    ),
    ("draft_lv.py", ["--n", "0"], "--n must be between 1 and 1000, got 0"),
    ("draft_lv.py", ["--n", "100000"], "--n must be between 1 and 1000, got 100000"),
    ("draft_full.py", ["--batch-size", "0"], "--batch-size must be between 1 and 1000000, got 0"),
    ("draft_full.py", ["--reward", "beauty"], "unknown reward 'beauty'; choose one of: aesthetic, pickscore"),
    ("ddpo.py", ["--eta", "0"], "--eta must be above 0 for DDPO"),
    ("ddpo.py", ["--estimator", "sf", "--num-inner-epochs", "2"], "DDPO-SF is on-policy"),
    ("ddpo.py", ["--clip-range", "-1"], "--clip-range must be a positive number, got -1.0"),
    ("ddpo.py", ["--adv-clip-max", "-1"], "--adv-clip-max must be a positive number, got -1.0"),
    ("ddpo.py", ["--timestep-fraction", "0"], "--timestep-fraction must be in (0, 1], got 0.0"),
    ("ddpo.py", ["--per-prompt-buffer", "0"], "--per-prompt-buffer must be at least 1, got 0"),
    (
        "ddpo.py",
        ["--timesteps-per-call", "3"],
        "--timesteps-per-call must be a divisor of the steps trained per trajectory",
    ),
    (
        "ddpo.py",
        ["--samples-per-epoch", "1", "--sample-batch-size", "1", "--train-batch-size", "1"],
        "--samples-per-epoch must be at least 2: advantages compare rewards, got 1",
    ),
    ("ddpo.py", ["--group-size", "3"], "--group-size must be at least 1 and a divisor of --sample-batch-size, got 3"),
    ("ddpo.py", ["--reward", "beauty+colorfulness"], "unknown reward 'beauty'; choose one of"),
    ("rwr.py", ["--samples-per-epoch", "5"], "--samples-per-epoch must be a multiple of --sample-batch-size"),
    ("rwr.py", ["--percentile", "120"], "--percentile must be between 0 and 100"),
    ("rwr.py", ["--sample-batch-size", "0"], "--sample-batch-size must be between 1 and 1000000, got 0"),
    ("rwr.py", ["--beta", "-1"], "--beta must be at least 0 (0: uniform weights), got -1.0"),
    ("braid.py", ["--eta", "0"], "--eta must be above 0 for BRAID"),
    ("braid.py", ["--c", "-1"], "--c must be at least 0 (0: the non-conservative baseline), got -1.0"),
    ("braid.py", ["--kl-weight", "nan"], "--kl-weight must be at least 0, got nan"),
    ("braid.py", ["--offline-quantile", "0"], "--offline-quantile must be in (0, 1], got 0.0"),
    ("braid.py", ["--val-fraction", "1"], "--val-fraction must be in (0, 1), got 1.0"),
    ("braid.py", ["--labeler", "beauty"], "unknown reward 'beauty'; choose one of"),
    ("braid.py", ["--conservatism", "boot", "--ensemble-size", "1"], "--ensemble-size must be at least 2 with boot"),
    ("braid.py", ["--offline-data", "/no/such/data"], "--offline-data /no/such/data does not exist"),
    ("braid.py", ["--k", "9"], "--k must be between 1 and --num-steps (4), got 9"),
    ("braid.py", ["--k", "0"], "--k must be between 1 and --num-steps (4), got 0"),
    ("braid.py", ["--offline-size", "0"], "--offline-size must be at least 1, got 0"),
    ("braid.py", ["--bonus-lambda", "0"], "--bonus-lambda must be above 0"),
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
def test_bad_values_of_shared_flags(script, tiny_sd_path, tmp_path, monkeypatch, capsys):
    base = ["--pretrained-model", tiny_sd_path, *TINY[script], "--output-dir", str(tmp_path)]
    for bad, message in SHARED_BAD:
        bad = [LENGTH[script] if flag is None else flag for flag in bad]
        expect_exit_2(script, [*base, *bad], message, monkeypatch, capsys)
        assert not os.listdir(tmp_path), bad  # refused before any run folder is made


@pytest.mark.parametrize("script, bad, message", METHOD_BAD)
def test_bad_values_of_method_flags(script, bad, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    args = ["--pretrained-model", tiny_sd_path, *TINY[script], "--output-dir", str(tmp_path), *bad]
    expect_exit_2(script, args, message, monkeypatch, capsys)
    assert not os.listdir(tmp_path)


def test_bad_prompt_files_and_output_folders(tiny_sd_path, tmp_path, monkeypatch, capsys):
    base = ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"]]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"a cat\x00\x00\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "a_file").write_text("")
    for flags, message in [
        (["--prompt-file", str(tmp_path)], "is a folder: pass a text file, one prompt a line"),
        (["--prompt-file", "/dev/null"], "the prompt file '/dev/null' has no prompts"),
        (["--prompt-file", str(tmp_path / "latin1.txt")], "is not UTF-8"),
        (["--prompt-file", str(tmp_path / "binary.txt")], "NUL bytes"),
        (["--prompt-file", str(tmp_path / "empty.txt")], "has no prompts"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "does not exist"),
        (["--output-dir", str(tmp_path / "a_file")], "cannot write the run folder"),
    ]:
        expect_exit_2("draft_k.py", [*base, *flags], message, monkeypatch, capsys)


def image_folder(path, text=None, damage=None):
    """14 random PNGs 0.png ... 13.png in path/data, and a scores.csv: `text` (str or bytes), or by default a
    file,score line for each of the first 12 (scores i / 10). `damage` (file, "garbage" or "truncated") spoils one
    image."""
    folder = path / "data"
    folder.mkdir()
    for i in range(14):
        pixels = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    if damage:
        image = folder / damage[0]
        image.write_bytes(b"not a png" if damage[1] == "garbage" else image.read_bytes()[:200])
    text = scores_csv() if text is None else text
    (folder / "scores.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def metadata_jsonl(path, *lines, rows=12, subfolder="") -> str:
    """The imagefolder layout: the 14 images of image_folder and a metadata.jsonl (file_name, prompt, reward) of the
    first `rows`, then `lines` as they are; in `subfolder` (e.g. train) if given."""
    folder = image_folder(path)
    (folder / "scores.csv").unlink()
    rows = [json.dumps({"file_name": f"{i}.png", "prompt": "a cat", "reward": i / 10}) for i in range(rows)]
    (folder / "metadata.jsonl").write_text("\n".join([*rows, *lines]) + "\n")
    if subfolder:
        (folder / subfolder).mkdir()
        for file in list(folder.iterdir()):
            if file.is_file():
                file.rename(folder / subfolder / file.name)
    return folder


def scores_csv(*lines, rows=12):
    return "\n".join(["file,score", *(f"{i}.png,{i / 10}" for i in range(rows)), *lines]) + "\n"


def offline_pt(path, data=None, **changes):
    """path/data.pt: `data` as given (bytes are written as they are), or by default 12 scores and uint8 images
    (12, 3, 8, 8), with `changes` replacing (None: removing) entries."""
    file = path / "data.pt"
    if isinstance(data, bytes):
        file.write_bytes(data)
        return file
    if data is None:
        images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        data = {"scores": torch.arange(12) / 10, "images": images}
        data = {k: v for k, v in {**data, **changes}.items() if v is not None}
    torch.save(data, file)
    return file


NAN = float("nan")
FEATURES = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))  # the tiny VAE's features: 4 x 4 x 4
BAD_DATA = [  # (case, the data under tmp_path, more flags, the one sentence: the file, the row or key, the fault)
    ("csv empty", lambda p: image_folder(p, ""), [], "scores.csv is empty"),
    ("csv no header", lambda p: image_folder(p, scores_csv()[11:]), [], "scores.csv starts with '0.png,0.0', not"),
    ("csv header only", lambda p: image_folder(p, "file,score\n"), [], "scores.csv has no rows of file and score"),
    ("csv not text", lambda p: image_folder(p, b"\x89PNG\r\n"), [], "scores.csv is not a CSV text file"),
    ("csv empty file cell", lambda p: image_folder(p, scores_csv(",0.5")), [],
     "scores.csv, line 14: the 'file' cell is empty"),
    ("csv duplicate", lambda p: image_folder(p, scores_csv("3.png,0.5")), [],
     "scores.csv, line 14: '3.png' is listed twice (also on line 5)"),
    ("csv text score", lambda p: image_folder(p, scores_csv("12.png,high")), [],
     "scores.csv, line 14: the score 'high' is not a finite number"),
    ("csv no score", lambda p: image_folder(p, scores_csv("12.png")), [], "scores.csv, line 14: it has no 'score'"),
    ("csv nan score", lambda p: image_folder(p, scores_csv("12.png,nan")), [], "line 14: the score 'nan' is not a"),
    ("csv inf score", lambda p: image_folder(p, scores_csv("12.png,-inf")), [], "line 14: the score '-inf' is not"),
    ("csv missing image", lambda p: image_folder(p, scores_csv("99.png,1")), [],
     "scores.csv, line 14: cannot read the image '99.png' (No such file or directory)"),
    ("csv corrupt image", lambda p: image_folder(p, damage=("5.png", "garbage")), [],
     "scores.csv, line 7: cannot read the image '5.png' (cannot identify image file"),
    ("csv truncated image", lambda p: image_folder(p, damage=("5.png", "truncated")), [],
     "scores.csv, line 7: cannot read the image '5.png'"),
    ("csv too few", lambda p: image_folder(p, scores_csv(rows=9)), [],
     "data has 9 scored examples and --val-fraction holds 1 out: the reward model needs at least 10 others"),
    ("csv equal scores", lambda p: image_folder(p, "file,score\n" + "".join(f"{i}.png,0.5\n" for i in range(12))),
     [], "data has all its scores equal"),
    ("jsonl no reward", lambda p: metadata_jsonl(p, '{"file_name": "12.png", "prompt": "a dog"}'), [],
     "metadata.jsonl, line 13: it has no 'reward'"),
    ("jsonl not json", lambda p: metadata_jsonl(p, "12.png,1.0"), [], "metadata.jsonl, line 13: is not JSON"),
    ("jsonl not an object", lambda p: metadata_jsonl(p, "[1, 2]"), [], "metadata.jsonl, line 13: is not a JSON obj"),
    ("jsonl text reward", lambda p: metadata_jsonl(p, '{"file_name": "12.png", "reward": "high"}'), [],
     "metadata.jsonl, line 13: the reward 'high' is not a finite number"),
    ("hub dataset offline", lambda p: "nobody/no-such-dataset", [], "could not load 'nobody/no-such-dataset'"),
    ("pt garbage", lambda p: offline_pt(p, b"not a torch file"), [],
     "cannot load {} with torch.load (not a file torch.save wrote"),
    ("pt numpy", lambda p: offline_pt(p, scores=np.arange(12.0)), [],
     "cannot load {} with torch.load (it holds numpy._core.multiarray._reconstruct, which only an unrestricted"),
    ("pt truncated", lambda p: offline_pt(p, offline_pt(p).read_bytes()[:1000]), [],
     "cannot load {} with torch.load (PytorchStreamReader failed"),
    ("pt not a dict", lambda p: offline_pt(p, [1, 2]), [], "data.pt must hold a dict with 'scores' and either"),
    ("pt no scores", lambda p: offline_pt(p, scores=None), [], "either 'images' or 'features', not a dict with keys"),
    ("pt no images", lambda p: offline_pt(p, images=None), [], "data.pt must hold a dict with 'scores' and either"),
    ("pt scores (N, 1)", lambda p: offline_pt(p, scores=torch.zeros(12, 1)), [],
     "data.pt: 'scores' must be a 1-D tensor (N,) of finite numbers, got torch.float32 of shape (12, 1)"),
    ("pt scores list", lambda p: offline_pt(p, scores=[0.0] * 12), [], "data.pt: 'scores' must be a 1-D tensor"),
    ("pt nan score", lambda p: offline_pt(p, scores=torch.arange(12.0).index_fill(0, torch.tensor(3), NAN)), [],
     "data.pt: 'scores' holds a value that is not a finite float32 (NaN, infinity or beyond 3.4e38) at [3]"),
    ("pt huge score", lambda p: offline_pt(p, scores=torch.arange(12.0, dtype=torch.float64) * 1e39), [],
     "data.pt: 'scores' holds a value that is not a finite float32 (NaN, infinity or beyond 3.4e38) at [1]"),
    ("pt float images", lambda p: offline_pt(p, images=torch.rand(12, 3, 8, 8)), [],
     "'images' must be a uint8 tensor (12, 3, H, W), one image per score (multiply float images in [0, 1] by 255"),
    ("pt images HWC", lambda p: offline_pt(p, images=torch.zeros(12, 8, 8, 3, dtype=torch.uint8)), [],
     "data.pt: 'images' must be a uint8 tensor (12, 3, H, W)"),
    ("pt more images", lambda p: offline_pt(p, images=torch.zeros(13, 3, 8, 8, dtype=torch.uint8)), [],
     "data.pt: 'images' must be a uint8 tensor (12, 3, H, W), one image per score"),
    ("pt true rewards", lambda p: offline_pt(p, true_rewards=torch.zeros(11)), [],
     "data.pt: 'true_rewards' must be a 1-D tensor (12,) of finite numbers, one per score, got torch.float32"),
    ("pt features dim", lambda p: offline_pt(p, images=None, features=FEATURES[:, :32]), [],
     "data.pt: 'features' must be a floating tensor (12, 64) of finite numbers from the --feature-model"),
    ("pt features 1-D", lambda p: offline_pt(p, images=None, features=FEATURES[0]), [], "data.pt: 'features' must"),
    ("pt fewer features", lambda p: offline_pt(p, images=None, features=FEATURES[:10]), [],
     "got torch.float32 of shape (10, 64)"),
    ("pt integer features", lambda p: offline_pt(p, images=None, features=FEATURES.long()), [],
     "data.pt: 'features' must be a floating tensor (12, 64)"),
    ("pt nan feature", lambda p: offline_pt(p, images=None, features=FEATURES.index_put((torch.tensor(2),
                                                                                          torch.tensor(5)),
                                                                                         torch.tensor(NAN))), [],
     "data.pt: 'features' holds a value that is not a finite float32 (NaN, infinity or beyond 3.4e38) at [2, 5]"),
    ("pt too few", lambda p: offline_pt(p, scores=torch.arange(5.0), images=torch.zeros(5, 3, 8, 8).byte()), [],
     "data.pt has 5 scored examples"),
    ("pt big val split", lambda p: offline_pt(p), ["--val-fraction", "0.9"],
     "data.pt has 12 scored examples and --val-fraction holds 10 out"),
    ("pt equal scores", lambda p: offline_pt(p, scores=torch.ones(12)), [], "data.pt has all its scores equal"),
]  # fmt: skip


@pytest.mark.parametrize("make, flags, message", [pytest.param(*case[1:], id=case[0]) for case in BAD_DATA])
def test_malformed_offline_data(make, flags, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    data = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_script("braid.py", ["--pretrained-model", tiny_sd_path, *TINY["braid.py"], "--offline-data", str(data),
                                *flags, "--output-dir", str(tmp_path / "runs")], monkeypatch)  # fmt: skip
    last_line = capsys.readouterr().err.splitlines()[-1]  # above it, only transformers' progress bars
    assert exit_info.value.code == 2 and last_line.startswith("error: ") and message.format(data) in last_line
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


# ---- faults: broken models and files, odd resumes, failing writes, Ctrl-C -------------------------------------------
def model_copy(path, tmp_path, scheduler=None, nan_vae=False, drop=None) -> str:
    """A copy of a pipeline folder with its scheduler config changed, its VAE's weights NaN, or a file removed."""
    import shutil

    from diffusers import AutoencoderKL, DDIMScheduler

    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    if scheduler:
        config = DDIMScheduler.load_config(copy, subfolder="scheduler")
        (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **scheduler}))
    if nan_vae:
        vae = AutoencoderKL.from_pretrained(copy, subfolder="vae")
        for p in vae.parameters():
            p.data.fill_(float("nan"))
        vae.save_pretrained(copy / "vae")
    if drop:
        os.remove(copy / drop)
    return str(copy)


class Payload:
    """Unpickling this creates a file: what a malicious .pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def finished_run(script, path, tmp_path, monkeypatch, steps="2") -> str:
    run_script(script, ["--pretrained-model", path, *TINY[script], LENGTH[script], steps, "--save-every", "1",
                        "--output-dir", str(tmp_path / "runs")], monkeypatch)  # fmt: skip
    (run_dir,) = (tmp_path / "runs").iterdir()
    return str(run_dir)


def test_a_broken_model_is_named_before_anything_is_trained(tiny_sd_path, tmp_path, monkeypatch, capsys):
    base = [*TINY["draft_k.py"], "--output-dir", str(tmp_path / "runs")]
    for model, message in [
        (model_copy(tiny_sd_path, tmp_path / "a", nan_vae=True), "the pretrained model's first samples are not finite"),
        (model_copy(tiny_sd_path, tmp_path / "b", scheduler={"beta_schedule": "foo"}),
         "has a scheduler config these scripts cannot use (foo is not implemented"),
        (model_copy(tiny_sd_path, tmp_path / "c", scheduler={"rescale_betas_zero_snr": True,
                                                             "timestep_spacing": "trailing"}),
         "starts from pure noise (a zero-terminal-SNR schedule"),
        (model_copy(tiny_sd_path, tmp_path / "d", drop="unet/diffusion_pytorch_model.safetensors"),
         "could not load the local"),
    ]:  # fmt: skip
        err = expect_exit_2("draft_k.py", ["--pretrained-model", model, *base], message, monkeypatch, capsys)
        assert "network" not in err  # a local folder: the network has nothing to do with it


def test_no_file_can_run_code_when_loaded(tiny_sd_path, tmp_path, monkeypatch, capsys):
    """BRAID's --offline-data .pt and a checkpoint's state.pt are read with weights_only: a pickle that would create a
    file is refused in one sentence, and the file is not created."""
    marker = tmp_path / "pwned"
    data = {
        "scores": torch.arange(12) / 10,
        "images": torch.zeros(12, 3, 8, 8, dtype=torch.uint8),
        "x": Payload(marker),
    }
    torch.save(data, tmp_path / "data.pt")
    args = ["--pretrained-model", tiny_sd_path, *TINY["braid.py"], "--offline-data", str(tmp_path / "data.pt"),
            "--output-dir", str(tmp_path / "runs")]  # fmt: skip
    expect_exit_2("braid.py", args, "which only an unrestricted torch.load rebuilds and which could run code",
                  monkeypatch, capsys)  # fmt: skip
    run_dir = finished_run("draft_k.py", tiny_sd_path, tmp_path, monkeypatch)
    state_file = os.path.join(run_dir, "checkpoints", "step_000002", "state.pt")
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "x": Payload(marker)}, state_file)
    checkpoint = os.path.dirname(state_file)  # named: refused (in a run folder it would be skipped, unread too)
    expect_exit_2("draft_k.py", ["--resume", checkpoint, "--train-steps", "3"], "could run code from the file",
                  monkeypatch, capsys)  # fmt: skip
    torch.save({k: v for k, v in state.items() if k != "optimizer"}, state_file)
    message = "cannot be read (it has no 'optimizer'); resume from an earlier one"
    expect_exit_2("draft_k.py", ["--resume", os.path.dirname(state_file), "--train-steps", "3"], message, monkeypatch,
                  capsys)  # fmt: skip
    assert not marker.exists()


@pytest.mark.slow  # 14 s
def test_a_resume_stays_in_its_own_run_and_says_what_it_cannot_do(tiny_sd_path, tmp_path, monkeypatch, capsys):
    import shutil

    run_dir = finished_run("draft_k.py", tiny_sd_path, tmp_path, monkeypatch)
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000001")
    shutil.copytree(checkpoint, tmp_path / "loose")
    for args, message in [
        (["--resume", str(tmp_path / "loose"), "--train-steps", "3"], "is a checkpoint outside a run folder's"),
        (["--resume", run_dir, "--train-steps", "1"], "--train-steps is 1 but"),
        (["--resume", run_dir, "--output-dir", str(tmp_path), "--train-steps", "3"],
         "but a resumed run continues in its own run folder"),
    ]:  # fmt: skip
        expect_exit_2("draft_k.py", args, message, monkeypatch, capsys)
    with pytest.raises(SystemExit) as exit_info:  # not an error: nothing to do
        run_script("draft_k.py", ["--resume", run_dir], monkeypatch)
    assert exit_info.value.code == 0 and "is already finished at step 2" in capsys.readouterr().out
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "rew')  # a kill mid-write
    run_script("draft_k.py", ["--resume", run_dir, "--train-steps", "3"], monkeypatch)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


@pytest.mark.slow  # 20 s
def test_a_non_finite_loss_names_its_likely_cause(tiny_sd_path, tmp_path, monkeypatch, capsys):
    import common.rewards

    make_reward = common.rewards.make_reward
    monkeypatch.setattr(
        common.rewards, "make_reward", lambda *a, **k: lambda x, p: make_reward(*a, **k)(x, p) * math.nan
    )
    expect_exit_2("draft_k.py", ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--output-dir",
                                 str(tmp_path)],
                  "is not finite before the first update: the likely cause is the model, or --guidance-scale 7.5;"
                  " stopped before the LoRA was overwritten, and no checkpoint has been written yet",
                  monkeypatch, capsys)  # fmt: skip


def run_limited(args: list[str], file_size: int):
    """`python draft_k.py ARGS` with files limited to `file_size` bytes (ulimit -f): writes beyond fail."""
    import resource

    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))  # noqa: E731
    return subprocess.run([sys.executable, "draft_k.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("file_size, flags, message", [
    (60 * 1024, ["--save-every", "1"], "could not write the checkpoint"),  # state.pt is ~90 kB
    (8 * 1024, ["--save-every", "100", "--sample-every", "1"], "could not write TensorBoard's events"),
])  # fmt: skip
def test_a_write_that_fails_ends_in_one_sentence_and_leaves_no_partial_checkpoint(file_size, flags, message,
                                                                                  tiny_sd_path, tmp_path):  # fmt: skip
    args = ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--train-steps", "5", *flags,
            "--output-dir", str(tmp_path)]  # fmt: skip
    result = run_limited(args, file_size)
    error = [line for line in result.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert result.returncode == 2 and len(error) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in error[0] and "File too large" in error[0], error
    for run_dir in tmp_path.iterdir():  # a run that logged no metrics yet leaves no folder at all
        checkpoints = os.listdir(run_dir / "checkpoints") if (run_dir / "checkpoints").exists() else []
        assert not [n for n in checkpoints if ".tmp" in n]


@pytest.mark.slow
def test_ctrl_c_ends_in_one_line_naming_the_last_checkpoint(tiny_sd_path, tmp_path):
    import signal
    import time

    args = ["--pretrained-model", tiny_sd_path, *TINY["draft_k.py"], "--train-steps", "100000", "--save-every", "1",
            "--output-dir", str(tmp_path)]  # fmt: skip
    process = subprocess.Popen([sys.executable, "draft_k.py", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        time.sleep(0.2)
        runs = list(tmp_path.iterdir())
        if runs and (runs[0] / "checkpoints").is_dir() and len(os.listdir(runs[0] / "checkpoints")) >= 2:
            break
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("interrupted")]
    assert process.returncode == 130 and "Traceback" not in stderr and len(lines) == 1, stderr[-2000:]
    assert "the last checkpoint is" in lines[0] and f"--resume {runs[0]}" in lines[0]
    assert not (runs[0] / ".lock").exists()
