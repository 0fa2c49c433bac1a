"""BRAID: the conservative reward model, the path KL against an independent computation, the script end to end."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.sampling import initial_latents, predict_noise
from common.sd import add_lora, encode_prompts, load_sd
from scripts import BRAID_TINY, ROOT, check_resume, definitions, read_metrics, run_script, run_subprocess

BRAID = definitions("braid.py")
TINY_PRETRAINED = os.path.join(ROOT, "assets", "tiny-sd")
TINY = BRAID_TINY


def image_folder(path, text=None, damage=None):
    """14 random PNGs 0.png ... 13.png in path/data, and a scores.csv: `text` (str or bytes), or by default a
    file,score line for each of the first 12 (scores i / 10). `damage` (file, "garbage" or "truncated") spoils one
    image."""
    folder = path / "data"
    folder.mkdir()
    for i in range(14):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    if damage:
        image = folder / damage[0]
        image.write_bytes(b"not a png" if damage[1] == "garbage" else image.read_bytes()[:200])
    text = scores_csv() if text is None else text
    (folder / "scores.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
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


def toy_data(n=400, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator)
    weights = torch.randn(dim, generator=generator)
    return features, features @ weights + 1.0, weights


def fit_ensemble(features, scores, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    resamples = [torch.randint(len(features), (len(features),), generator=generator) for _ in range(size)]
    return [BRAID["fit_head"](features[i], scores[i], 300, 1e-3, generator) for i in resamples]


def test_reward_head_fits_a_known_function():
    features, scores, weights = toy_data()
    (head,) = fit_ensemble(features, scores, 1)
    test = torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    prediction = head(test)[0]
    assert torch.nn.functional.mse_loss(prediction, test @ weights + 1.0) < 0.01 * scores.var()


def test_bootstrap_spread_grows_away_from_the_data_and_c0_is_the_mean():
    features, scores, _ = toy_data()
    heads = fit_ensemble(features, scores, 4)
    near, far = features[:50], 10 * torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    conservative = BRAID["ConservativeReward"](heads, c=1.0)
    spread = lambda x: conservative(x)[1] - conservative(x)[0]  # noqa: E731  (c = 1: proxy - r_c = std)
    assert spread(far).mean() > 3 * spread(near).mean()
    mean = torch.stack([h(far)[0] for h in heads]).mean(0)
    r_c, proxy = BRAID["ConservativeReward"](heads, c=0.0)(far)
    assert torch.equal(r_c, proxy) and torch.allclose(r_c, mean)


def test_bonus_is_small_on_the_data_and_grows_away_from_it():
    features, scores, _ = toy_data(n=2000)
    heads = fit_ensemble(features, scores, 1)
    conservative = BRAID["ConservativeReward"](heads, c=1.0, features=features, bonus_lambda=1e-3)
    bonus = lambda x: conservative(x)[1] - conservative(x)[0]  # noqa: E731
    on_data, far = bonus(features[:100]), bonus(20 * torch.randn(100, 8, generator=torch.Generator().manual_seed(3)))
    assert on_data.max() < 0.2 and far.mean() > 10 * on_data.mean()
    # by hand: sqrt(f^T (sum_i f_i f_i^T + lambda I)^-1 f)
    f, f_data = heads[0](features[:3])[1].double(), heads[0](features)[1].double()
    sigma = f_data.T @ f_data + 1e-3 * torch.eye(16, dtype=torch.float64)
    expected = torch.sqrt((f @ torch.linalg.inv(sigma) * f).sum(-1)).float()
    torch.testing.assert_close(on_data[:3], expected, rtol=1e-4, atol=1e-6)


def test_sampling_follows_diffusers_and_the_path_kl_matches_an_independent_computation(tiny_sd_path):
    sd, pretrained = load_sd(tiny_sd_path), load_sd(tiny_sd_path)  # the second never gets a LoRA
    add_lora(sd.unet, rank=4)
    prompt_embeds, negative_embeds = encode_prompts(sd, ["a cat", "a dog"]), encode_prompts(sd, [""])
    latents = initial_latents(sd, 2, 16, torch.Generator().manual_seed(0))

    def sample_with_kl():
        args = (sd, latents, prompt_embeds, negative_embeds, 4, 7.5, 1.0, 4, torch.Generator().manual_seed(1))
        return BRAID["sample_with_kl"](*args)

    _, kl = sample_with_kl()
    assert torch.equal(kl, torch.zeros(2))  # the LoRA starts as the identity
    for name, p in sd.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    x0, kl = sample_with_kl()
    assert (kl > 0).all()
    kl.sum().backward()  # the gradient reaches the LoRA, and the adapters are left switched on
    assert all(p.requires_grad and p.grad is not None for n, p in sd.unet.named_parameters() if "lora_" in n)
    # independently: diffusers' DDIM step at eta 1 with the same noise gives the trajectory; without noise, each
    # model's mean; its variance, sigma_t^2
    expected, x_t, generator = torch.zeros(2), latents, torch.Generator().manual_seed(1)
    scheduler = pretrained.scheduler
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = predict_noise(sd.unet, x_t, t, prompt_embeds, negative_embeds, 7.5)
            eps_pre = predict_noise(pretrained.unet, x_t, t, prompt_embeds, negative_embeds, 7.5)
            zero = torch.zeros_like(x_t)
            mean = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=zero).prev_sample
            mean_pre = scheduler.step(eps_pre, t, x_t, eta=1.0, variance_noise=zero).prev_sample
            variance = scheduler._get_variance(t, t - 1000 // 4)
            expected += ((mean - mean_pre) ** 2).mean(dim=(1, 2, 3)) / (2 * variance)
            x_t = scheduler.step(eps, t, x_t, eta=1.0, generator=generator).prev_sample
    torch.testing.assert_close(x0.detach(), x_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl.detach(), expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("variant", [["--conservatism", "boot"], ["--conservatism", "bonus"], ["--c", "0"]])
def test_script_runs_on_synthesised_data(variant, tiny_sd_path, tmp_path):
    stderr = run_subprocess("braid.py", ["--pretrained-model", tiny_sd_path, *TINY, *variant, "--train-steps", "2",
                                         "--offline-quantile", "0.5", "--output-dir", str(tmp_path)])  # fmt: skip
    assert "warn" not in stderr.lower()
    run_dir, metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward_mean", "proxy_reward_mean", "kl", "true_reward_mean", "offline_best", "offline_median",
                "reward_model_val_mse", "loss", "grad_norm", "eval_reward_mean"):  # fmt: skip
        assert all(isinstance(m[key], float) for m in metrics), key
    assert metrics[0]["kl"] == 0.0 and metrics[1]["kl"] > 0  # LoRA starts as the identity
    if variant == ["--c", "0"]:
        assert all(m["reward_mean"] == pytest.approx(m["proxy_reward_mean"]) for m in metrics)
    data = torch.load(os.path.join(run_dir, "offline_data.pt"))
    assert len(data["scores"]) == 12 and data["images"].dtype == torch.uint8  # the lower half of 24
    for name in ("reward_model.pt", "pytorch_lora_weights.safetensors", "samples/step_000000.png"):
        assert os.path.isfile(os.path.join(run_dir, name))


def test_script_runs_on_a_folder_of_images_with_scores(tiny_sd_path, tmp_path):
    folder = image_folder(tmp_path)
    run_subprocess("braid.py", ["--pretrained-model", tiny_sd_path, *TINY, "--offline-data", str(folder),
                                "--train-steps", "2", "--output-dir", str(tmp_path / "runs")])  # fmt: skip
    _, metrics = read_metrics(tmp_path / "runs")
    assert metrics[-1]["true_reward_mean"] is None and metrics[-1]["offline_best"] == pytest.approx(1.1)


def test_resume_reproduces_the_uninterrupted_run(tiny_sd_path, tmp_path, monkeypatch):
    """The resumed run reuses the cached offline data and refits the same reward model."""
    check_resume("braid.py", ["--pretrained-model", tiny_sd_path, *TINY], "--train-steps", tmp_path, monkeypatch,
                 keys=("reward_mean", "proxy_reward_mean", "kl", "true_reward_mean", "loss", "grad_norm"))  # fmt: skip


def test_conservative_reward_rises_on_the_tiny_pretrained_model(tmp_path, monkeypatch):
    """On assets/tiny-sd (coloured shapes) with the colourfulness labeler: the mean conservative reward of the last
    4 steps against the first 4, beyond 3 standard errors of such a mean (16 images) at the start."""
    run_script("braid.py", ["--pretrained-model", TINY_PRETRAINED, "--prompts", "shapes", "--labeler", "colorfulness",
                            "--feature-model", "vae", "--resolution", "32", "--num-steps", "8", "--guidance-scale", "5",
                            "--offline-size", "128", "--reward-model-steps", "500", "--train-steps", "12",
                            "--learning-rate", "3e-2", "--output-dir", str(tmp_path)], monkeypatch)  # fmt: skip
    _, metrics = read_metrics(tmp_path)
    rewards = [m["reward_mean"] for m in metrics]
    gain = sum(rewards[-4:]) / 4 - sum(rewards[:4]) / 4
    assert gain > 3 * metrics[0]["reward_std"] / 4, (gain, rewards)


@pytest.mark.parametrize("bad, message", [
    (["--eta", "0"], "--eta must be above 0 for BRAID"),
    (["--labeler", "beauty"], "unknown labeler 'beauty'"),
    (["--conservatism", "boot", "--ensemble-size", "1"], "needs --ensemble-size of at least 2"),
    (["--offline-data", "/no/such/data"], "is neither a .pt file nor a folder with a scores.csv"),
    (["--k", "9"], "--k must be between 1 and --num-steps (4), got 9"),
    (["--offline-size", "0"], "--offline-size must be at least 1, got 0"),
    (["--bonus-lambda", "0"], "--bonus-lambda must be above 0"),
])  # fmt: skip
def test_bad_input_ends_with_one_sentence_and_status_2(bad, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script("braid.py", ["--pretrained-model", tiny_sd_path, *TINY, *bad, "--output-dir", str(tmp_path)],
                   monkeypatch)  # fmt: skip
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


NAN = float("nan")
FEATURES = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))  # the tiny VAE's features: 4 x 4 x 4
BAD_DATA = [  # (case, the data under tmp_path, more flags, the one sentence: the file, the row or key, the fault)
    ("csv empty", lambda p: image_folder(p, ""), [], "scores.csv is empty"),
    ("csv no header", lambda p: image_folder(p, scores_csv()[11:]), [], "scores.csv starts with '0.png,0.0', not"),
    ("csv header only", lambda p: image_folder(p, "file,score\n"), [], "scores.csv has no lines of file,score"),
    ("csv not text", lambda p: image_folder(p, b"\x89PNG\r\n"), [], "scores.csv is not a CSV text file"),
    ("csv empty file cell", lambda p: image_folder(p, scores_csv(",0.5")), [],
     "scores.csv, line 14: the 'file' cell is empty"),
    ("csv duplicate", lambda p: image_folder(p, scores_csv("3.png,0.5")), [],
     "scores.csv, line 14: '3.png' is listed twice (also on line 5)"),
    ("csv text score", lambda p: image_folder(p, scores_csv("12.png,high")), [],
     "scores.csv, line 14: the score 'high' is not a finite number"),
    ("csv no score", lambda p: image_folder(p, scores_csv("12.png")), [], "line 14: the score '' is not a finite"),
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
    ("pt garbage", lambda p: offline_pt(p, b"not a torch file"), [], "cannot load {} with torch.load (invalid load"),
    ("pt truncated", lambda p: offline_pt(p, offline_pt(p).read_bytes()[:1000]), [],
     "cannot load {} with torch.load (PytorchStreamReader failed"),
    ("pt not a dict", lambda p: offline_pt(p, [1, 2]), [], "data.pt must hold a dict with 'scores' and either"),
    ("pt no scores", lambda p: offline_pt(p, scores=None), [], "either 'images' or 'features', not a dict with keys"),
    ("pt no images", lambda p: offline_pt(p, images=None), [], "data.pt must hold a dict with 'scores' and either"),
    ("pt scores (N, 1)", lambda p: offline_pt(p, scores=torch.zeros(12, 1)), [],
     "data.pt: 'scores' must be a 1-D tensor (N,) of finite numbers, got torch.float32 of shape (12, 1)"),
    ("pt scores list", lambda p: offline_pt(p, scores=[0.0] * 12), [], "data.pt: 'scores' must be a 1-D tensor"),
    ("pt nan score", lambda p: offline_pt(p, scores=torch.arange(12.0).index_fill(0, torch.tensor(3), NAN)), [],
     "data.pt: 'scores' holds a NaN or infinity at [3]"),
    ("pt huge score", lambda p: offline_pt(p, scores=torch.arange(12.0, dtype=torch.float64) * 1e39), [],
     "data.pt: 'scores' holds a NaN or infinity at [1]"),
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
     "data.pt: 'features' holds a NaN or infinity at [2, 5]"),
    ("pt too few", lambda p: offline_pt(p, scores=torch.arange(5.0), images=torch.zeros(5, 3, 8, 8).byte()), [],
     "data.pt has 5 scored examples"),
    ("pt big val split", lambda p: offline_pt(p), ["--val-fraction", "0.9"],
     "data.pt has 12 scored examples and --val-fraction holds 10 out"),
    ("pt equal scores", lambda p: offline_pt(p, scores=torch.ones(12)), [], "data.pt has all its scores equal"),
]  # fmt: skip


@pytest.mark.parametrize("make, flags, message", [pytest.param(*case[1:], id=case[0]) for case in BAD_DATA])
def test_malformed_offline_data_ends_with_one_sentence_and_status_2(
    make, flags, message, tiny_sd_path, tmp_path, monkeypatch, capsys
):
    data = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_script("braid.py", ["--pretrained-model", tiny_sd_path, *TINY, "--offline-data", str(data), *flags,
                                "--output-dir", str(tmp_path / "runs")], monkeypatch)  # fmt: skip
    last_line = capsys.readouterr().err.splitlines()[-1]  # above it, only transformers' progress bars
    assert exit_info.value.code == 2 and last_line.startswith("error: ") and message.format(data) in last_line
