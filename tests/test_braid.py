"""BRAID: the conservative reward model, the path KL against an independent computation, the script end to end."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.sampling import initial_latents, predict_noise
from common.sd import add_lora, encode_prompts, load_sd
from scripts import BRAID_TINY as TINY
from scripts import ROOT, check_resume, definitions, read_metrics, run_script, run_subprocess

BRAID = definitions("braid.py")
TINY_PRETRAINED = os.path.join(ROOT, "assets", "tiny-sd")


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
    folder = tmp_path / "data"
    folder.mkdir()
    rows = ["file,score"]
    for i in range(12):
        pixels = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i / 10}")
    (folder / "scores.csv").write_text("\n".join(rows) + "\n")
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
    (["--eta", "0"], "BRAID's path KL needs --eta > 0"),
    (["--labeler", "beauty"], "unknown labeler 'beauty'"),
    (["--conservatism", "boot", "--ensemble-size", "1"], "needs --ensemble-size of at least 2"),
    (["--offline-data", "/no/such/data"], "is neither a .pt file nor a folder with a scores.csv"),
    (["--k", "9"], "--k must be between 1 and --num-steps (4), got 9"),
    (["--offline-size", "0"], "--offline-size must be at least 1, got 0"),
])  # fmt: skip
def test_bad_input_ends_with_one_sentence_and_status_2(bad, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script("braid.py", ["--pretrained-model", tiny_sd_path, *TINY, *bad, "--output-dir", str(tmp_path)],
                   monkeypatch)  # fmt: skip
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
