"""The DDIM loop and step against diffusers and against the formulas; which steps carry gradient."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from common.rewards import Colorfulness
from common.sampling import ddim_step, decode, initial_latents, predict_noise, sample
from common.sd import add_lora, encode_prompts, load_sd

PROMPTS = ["a photo of a cat", "a red fox"]
RESOLUTION, STEPS, GUIDANCE = 32, 8, 7.5


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    return load_sd(tiny_sd_path)


@pytest.fixture(scope="module")
def sd_and_pipeline(tiny_sd_eps_or_v_path):
    """Our model and diffusers' pipeline with its DDIMScheduler, from the same folder (epsilon, then v)."""
    path = tiny_sd_eps_or_v_path
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    return load_sd(path), StableDiffusionPipeline.from_pretrained(path, scheduler=scheduler, safety_checker=None)


@pytest.fixture(scope="module")
def lora_sd(tiny_sd_path):
    """The tiny model with a LoRA whose B matrices are non-zero, so every LoRA parameter gets gradient."""
    sd = load_sd(tiny_sd_path)
    torch.manual_seed(3)
    for p in add_lora(sd.unet, rank=4):
        p.data.normal_(std=0.1)
    return sd


def embeds(sd, prompts=PROMPTS):
    return encode_prompts(sd, prompts), encode_prompts(sd, [""])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_loop_equals_diffusers_pipeline(sd_and_pipeline, eta):
    sd, pipeline = sd_and_pipeline
    assert sd.scheduler.config.prediction_type == pipeline.scheduler.config.prediction_type
    latents = initial_latents(sd, len(PROMPTS), RESOLUTION, torch.Generator().manual_seed(0))
    prompt_embeds, negative_embeds = embeds(sd)
    with torch.no_grad():  # at eta = 1 both draw the step noise from generators seeded alike
        ours, _ = sample(sd, latents, prompt_embeds, negative_embeds, STEPS, GUIDANCE, eta,
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
        ours_images = decode(sd, ours)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=eta, latents=latents.clone(),
                  height=RESOLUTION, width=RESOLUTION)  # fmt: skip
    theirs = pipeline(PROMPTS, output_type="latent", generator=torch.Generator().manual_seed(1), **kwargs).images
    theirs_images = pipeline(PROMPTS, output_type="pt", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert ours.shape == (2, 4, RESOLUTION // 2, RESOLUTION // 2)
    assert relative_error(ours, theirs) < 1e-5
    assert relative_error(ours_images, theirs_images) < 1e-5


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_equals_diffusers_step(sd_and_pipeline, eta):
    """x_{t-1} and x0_hat as DDIMScheduler.step computes them from the model's output (eps, or v), with the step
    noise drawn from generators seeded alike; at every kind of step, the last one included."""
    sd, pipeline = sd_and_pipeline
    sd.scheduler.set_timesteps(STEPS)
    pipeline.scheduler.set_timesteps(STEPS)
    torch.manual_seed(0)
    for t in sd.scheduler.timesteps[[0, 4, -1]]:
        latents, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        ours = ddim_step(sd.scheduler, output, t, latents, eta, generator=torch.Generator().manual_seed(1))
        theirs = pipeline.scheduler.step(output, t, latents, eta, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours.latents, theirs.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.pred_x0, theirs.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_step_mean_and_std_follow_the_formulas(sd):
    """eta = 1: the mean is diffusers' step without noise, sigma is the DDIM formula, and samples have that
    mean and std."""
    sd.scheduler.set_timesteps(STEPS)
    t = sd.scheduler.timesteps[3]
    torch.manual_seed(0)
    latents, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    step = ddim_step(sd.scheduler, eps, t, latents, eta=1.0)
    abar = sd.scheduler.alphas_cumprod
    abar_t, abar_prev = abar[t], abar[t - 1000 // STEPS]
    sigma = math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    assert step.std.item() == pytest.approx(sigma, rel=1e-6)
    no_noise = sd.scheduler.step(eps, t, latents, eta=1.0, variance_noise=torch.zeros_like(eps)).prev_sample
    torch.testing.assert_close(step.mean, no_noise, rtol=1e-5, atol=1e-6)
    draws = torch.stack([ddim_step(sd.scheduler, eps, t, latents, eta=1.0).latents for _ in range(2000)])
    standardised = (draws - step.mean) / sigma  # (2000, 1, 4, 8, 8), N(0, 1) if mean and std are right
    assert standardised.mean().abs() < 0.01 and (standardised.std() - 1).abs() < 0.01
    assert standardised.mean(0).abs().max() < 0.15  # per dimension: 2000 draws, 256 dims, ~5 sigma


def test_step_log_prob_is_the_gaussian_density_mean_over_dims(sd):
    sd.scheduler.set_timesteps(STEPS)
    torch.manual_seed(0)
    for t in sd.scheduler.timesteps[[0, 4, -1]]:  # including the last step, where abar_prev = alphas_cumprod[0]
        latents, eps, prev = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        for given in (None, prev):
            step = ddim_step(sd.scheduler, eps, t, latents, eta=1.0, prev_latents=given)
            density = torch.distributions.Normal(step.mean, step.std).log_prob(step.latents)
            torch.testing.assert_close(step.log_prob, density.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    assert ddim_step(sd.scheduler, eps, t, latents, eta=0.0).log_prob is None


def lora_gradients(sd, checkpointing: bool):
    """The DRaFT loop (as the scripts write it) with every step carrying gradient, at eta = 1."""
    prompt_embeds, negative_embeds = embeds(sd)
    latents = initial_latents(sd, 2, RESOLUTION, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    sd.unet.zero_grad()
    sd.scheduler.set_timesteps(STEPS)
    for t in sd.scheduler.timesteps:
        eps = predict_noise(sd.unet, latents, t, prompt_embeds, negative_embeds, GUIDANCE, checkpointed=checkpointing)
        latents = ddim_step(sd.scheduler, eps, t, latents, eta=1.0, generator=generator).latents
    rewards = Colorfulness()(decode(sd, latents, checkpoint_vae=checkpointing))
    rewards.sum().backward()
    return rewards.detach(), [p.grad.clone() for p in sd.unet.parameters() if p.requires_grad]


def test_checkpointing_gives_the_same_gradient(lora_sd):
    rewards, grads = lora_gradients(lora_sd, checkpointing=False)
    rewards_ckpt, grads_ckpt = lora_gradients(lora_sd, checkpointing=True)
    torch.testing.assert_close(rewards_ckpt, rewards)
    assert all(g.abs().sum() > 0 for g in grads)  # every LoRA parameter is reached
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_pretrained_prediction_is_the_model_without_its_lora_forward_and_backward(lora_sd, tiny_sd_path, checkpointed):
    # BRAID's KL reference: with the LoRA switched off, also in checkpointing's recomputation in the backward pass
    # (were the switch outside the checkpointed call, the recomputed activations would be the LoRA model's)
    pretrained, (prompt_embeds, negative_embeds) = load_sd(tiny_sd_path), embeds(lora_sd)
    x_t = initial_latents(lora_sd, 2, RESOLUTION, torch.Generator().manual_seed(0))
    t, results = torch.tensor(501), []
    lora_sd.unet.zero_grad(set_to_none=True)
    for sd, flag in ((lora_sd, True), (pretrained, False)):
        x = x_t.clone().requires_grad_()
        eps = predict_noise(sd.unet, x, t, prompt_embeds, negative_embeds, GUIDANCE, checkpointed, pretrained=flag)
        (eps**2).sum().backward()
        results.append((eps.detach(), x.grad))
    (eps, grad), (eps_pre, grad_pre) = results
    torch.testing.assert_close(eps, eps_pre)
    torch.testing.assert_close(grad, grad_pre)
    assert all(p.grad is None for n, p in lora_sd.unet.named_parameters() if "lora_" in n)  # nothing reaches the LoRA
    with torch.no_grad():  # and the LoRA is switched on again (the test's LoRA changes the prediction)
        assert not torch.allclose(predict_noise(lora_sd.unet, x_t, t, prompt_embeds, negative_embeds, GUIDANCE), eps)


def test_sample_builds_no_graph(lora_sd):
    prompt_embeds, negative_embeds = embeds(lora_sd)
    latents = initial_latents(lora_sd, 2, RESOLUTION, torch.Generator().manual_seed(0)).requires_grad_()
    x0, _ = sample(lora_sd, latents, prompt_embeds, negative_embeds, STEPS, GUIDANCE)
    assert not x0.requires_grad


def test_same_seed_same_latents_rewards_and_gradients(lora_sd):
    first, second = lora_gradients(lora_sd, False), lora_gradients(lora_sd, False)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    a = initial_latents(lora_sd, 2, RESOLUTION, torch.Generator().manual_seed(5))
    assert torch.equal(a, initial_latents(lora_sd, 2, RESOLUTION, torch.Generator().manual_seed(5)))


def test_trajectory_records_every_step(sd):
    prompt_embeds, negative_embeds = embeds(sd)
    latents = initial_latents(sd, 2, RESOLUTION, torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0, trajectory = sample(sd, latents, prompt_embeds, negative_embeds, STEPS, GUIDANCE, eta=1.0, trajectory=True,
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert len(trajectory.latents) == STEPS + 1 and len(trajectory.log_probs) == STEPS
    assert trajectory.latents[0] is latents and trajectory.latents[-1] is x0
    assert torch.equal(torch.stack(trajectory.timesteps), sd.scheduler.timesteps)
    # replaying a stored step scores the stored action with the same log-prob (what DDPO's first PPO step sees)
    i = 3
    t, x_t, x_prev = trajectory.timesteps[i], trajectory.latents[i], trajectory.latents[i + 1]
    with torch.no_grad():
        eps = predict_noise(sd.unet, x_t, t, prompt_embeds, negative_embeds, GUIDANCE)
        replay = ddim_step(sd.scheduler, eps, t, x_t, eta=1.0, prev_latents=x_prev)
    torch.testing.assert_close(replay.log_prob, trajectory.log_probs[i])


def test_one_timestep_per_sample_equals_separate_steps(sd):
    """DDPO trains on a batch whose samples sit at different timesteps."""
    sd.scheduler.set_timesteps(STEPS)
    timesteps = sd.scheduler.timesteps[[0, 5, STEPS - 1]]
    torch.manual_seed(0)
    latents, prev = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    prompt_embeds, negative_embeds = embeds(sd, ["a cat", "a dog", "a fox"])
    with torch.no_grad():
        eps = predict_noise(sd.unet, latents, timesteps, prompt_embeds, negative_embeds, GUIDANCE)
        batched = ddim_step(sd.scheduler, eps, timesteps, latents, eta=1.0, prev_latents=prev)
        for i, t in enumerate(timesteps):
            eps_i = predict_noise(sd.unet, latents[i : i + 1], t, prompt_embeds[i : i + 1], negative_embeds, GUIDANCE)
            single = ddim_step(sd.scheduler, eps_i, t, latents[i : i + 1], eta=1.0, prev_latents=prev[i : i + 1])
            torch.testing.assert_close(eps[i : i + 1], eps_i, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                batched.mean[i : i + 1], single.mean, rtol=1e-4, atol=1e-4
            )  # fp32 rounding / sqrt(abar)
            torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob, rtol=1e-4, atol=1e-4)


def test_the_ddim_loop_reads_nothing_back_to_the_host(sd):
    """No .item() in sampling at eta 0 and 1, nor in a step with one timestep per sample (DDPO's training): on CUDA
    each would stall the host until the device is done. Indexing with a 0-d tensor is one, so ddim_step avoids it."""
    prompt_embeds, negative_embeds = embeds(sd)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    latents = initial_latents(sd, 2, RESOLUTION, generators)
    with torch.no_grad(), torch.profiler.profile() as profile:
        for eta in (0.0, 1.0):
            sample(sd, latents, prompt_embeds, negative_embeds, 2, GUIDANCE, eta, generators, trajectory=True)
        ddim_step(sd.scheduler, latents, sd.scheduler.timesteps[[0, 1]], latents, 1.0, prev_latents=latents)
    ops = [event.key for event in profile.key_averages()]
    assert "aten::mkldnn_convolution" in ops or "aten::convolution" in ops  # the profiler saw the UNet
    assert "aten::_local_scalar_dense" not in ops  # what .item() runs
