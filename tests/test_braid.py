"""BRAID: the conservative reward model, the path KL against an independent computation, the script end to end and
learning on the shipped tiny model (malformed offline data: test_bad_input.py)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.models import load_model
from scripts import BRAID_TINY, check_resume, definitions, read_metrics, run_script

BRAID = definitions("braid.py")
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


@pytest.mark.slow  # 20 s; the fast tier keeps the bonus and the head fit
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
    model, pretrained = load_model(tiny_sd_path, resolution=16), load_model(tiny_sd_path, resolution=16)
    model.add_lora(rank=4)  # the second model never gets one
    cond = model.encode(["a cat", "a dog"])
    latents = model.initial_latents(2, torch.Generator().manual_seed(0))

    def sample_with_kl():
        return BRAID["sample_with_kl"](model, latents, cond, 4, 7.5, 1.0, 4, torch.Generator().manual_seed(1))

    _, kl = sample_with_kl()
    assert torch.equal(kl, torch.zeros(2))  # the LoRA starts as the identity
    for name, p in model.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    x0, kl = sample_with_kl()
    assert (kl > 0).all()
    kl.sum().backward()  # the gradient reaches the LoRA, and the adapters are left switched on
    assert all(p.requires_grad and p.grad is not None for n, p in model.denoiser.named_parameters() if "lora_" in n)
    # independently: diffusers' DDIM step at eta 1 with the same noise gives the trajectory; without noise, each
    # model's mean; its variance, sigma_t^2
    expected, x_t, generator = torch.zeros(2), latents, torch.Generator().manual_seed(1)
    scheduler = pretrained.scheduler
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model.predict(x_t, t, cond, 7.5)
            eps_pre = pretrained.predict(x_t, t, cond, 7.5)
            zero = torch.zeros_like(x_t)
            mean = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=zero).prev_sample
            mean_pre = scheduler.step(eps_pre, t, x_t, eta=1.0, variance_noise=zero).prev_sample
            variance = scheduler._get_variance(t, t - 1000 // 4)
            expected += ((mean - mean_pre) ** 2).mean(dim=(1, 2, 3)) / (2 * variance)
            x_t = scheduler.step(eps, t, x_t, eta=1.0, generator=generator).prev_sample
    torch.testing.assert_close(x0.detach(), x_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl.detach(), expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(
    "variant",
    [
        ["--conservatism", "boot"],
        pytest.param(["--conservatism", "bonus"], marks=pytest.mark.slow),
        pytest.param(["--c", "0"], marks=pytest.mark.slow),
    ],
)
def test_script_runs_on_synthesised_data(variant, tiny_sd_path, tmp_path, monkeypatch):
    run_script("braid.py", ["--pretrained-model", tiny_sd_path, *TINY, *variant, "--train-steps", "2",
                            "--offline-quantile", "0.5", "--output-dir", str(tmp_path)], monkeypatch)  # fmt: skip
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


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param("scores.csv", marks=pytest.mark.slow),
        pytest.param("metadata.jsonl in train/", marks=pytest.mark.slow),
        pytest.param("metadata.csv", marks=pytest.mark.slow),
    ],
)
def test_script_runs_on_a_folder_of_images_with_scores(layout, tiny_sd_path, tmp_path, monkeypatch):
    """Your own data: a folder of images and their scores, in the project's scores.csv or the `datasets` library's
    imagefolder layout (metadata.jsonl or .csv with file_name, prompt, reward; also in a train/ subfolder)."""
    from test_bad_input import metadata_jsonl

    if layout == "scores.csv":
        folder = image_folder(tmp_path)
    elif layout == "metadata.csv":
        folder = image_folder(tmp_path)
        (folder / "scores.csv").unlink()
        rows = "".join(f"{i}.png,a cat,{i / 10}\n" for i in range(12))
        (folder / "metadata.csv").write_text("file_name,prompt,reward\n" + rows)
    else:
        folder = metadata_jsonl(tmp_path, subfolder="train")
    run_script("braid.py", ["--pretrained-model", tiny_sd_path, *TINY, "--offline-data", str(folder),
                            "--train-steps", "2", "--output-dir", str(tmp_path / "runs")], monkeypatch)  # fmt: skip
    _, metrics = read_metrics(tmp_path / "runs")
    assert metrics[-1]["true_reward_mean"] is None and metrics[-1]["offline_best"] == pytest.approx(1.1)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_sd_path, tmp_path, monkeypatch):
    """The resumed run reuses the cached offline data and refits the same reward model."""
    check_resume("braid.py", ["--pretrained-model", tiny_sd_path, *TINY], "--train-steps", tmp_path, monkeypatch,
                 keys=("reward_mean", "proxy_reward_mean", "kl", "true_reward_mean", "loss", "grad_norm"))  # fmt: skip


@pytest.mark.slow
def test_conservative_reward_rises_on_the_tiny_pretrained_model(tmp_path, monkeypatch):
    """On assets/tiny-sd (coloured shapes) with the colourfulness labeler: the mean conservative reward of the last
    4 steps against the first 4, beyond 3 standard errors of such a mean (16 images) at the start."""
    run_script("braid.py", ["--preset", "tiny", "--num-steps", "8", "--offline-size", "128", "--reward-model-steps",
                            "500", "--train-steps", "12", "--learning-rate", "3e-2", "--output-dir", str(tmp_path)],
               monkeypatch)  # fmt: skip
    _, metrics = read_metrics(tmp_path)
    rewards = [m["reward_mean"] for m in metrics]
    gain = sum(rewards[-4:]) / 4 - sum(rewards[:4]) / 4
    assert gain > 3 * metrics[0]["reward_std"] / 4, (gain, rewards)
