"""The sampler against diffusers and against the formulas (docs/ALGORITHMS.md, section 1); guidance, checkpointing and
the pretrained prediction; which steps carry gradient."""

import math

import pytest
import torch
from diffusers import DDIMScheduler
from test_models import plain_pipeline

from common.models import load_model
from common.rewards import Colorfulness
from common.sampling import ddim_step, sample

PROMPTS = ["a photo of a cat", "a red fox"]
RESOLUTION, STEPS, GUIDANCE = 32, 8, 7.5


@pytest.fixture(scope="module")
def model(tiny_sd_path):
    return load_model(tiny_sd_path, resolution=RESOLUTION)


@pytest.fixture(scope="module", params=["sd", "sd-v", "sdxl", "sd3"])
def model_and_pipeline(request):
    """Our model and the family's diffusers pipeline, from the same folder: SD with epsilon, its v-prediction twin
    and SDXL with a DDIMScheduler, SD 3 with its own flow scheduler (our eta 0 step is its Euler step)."""
    path = request.getfixturevalue(
        {"sd": "tiny_sd_path", "sd-v": "tiny_sd_v_path", "sdxl": "tiny_sdxl_path", "sd3": "tiny_sd3_path"}[
            request.param
        ]
    )
    return load_model(path, resolution=RESOLUTION), plain_pipeline(request.param.removesuffix("-v"), path)


@pytest.fixture(scope="module")
def lora_model(tiny_sd_path):
    """The tiny model with a LoRA whose B matrices are non-zero, so every LoRA parameter gets gradient."""
    model = load_model(tiny_sd_path, resolution=RESOLUTION)
    torch.manual_seed(3)
    for p in model.add_lora(rank=4):
        p.data.normal_(std=0.1)
    return model


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_loop_equals_diffusers_pipeline(model_and_pipeline, eta):
    model, pipeline = model_and_pipeline
    if model.family == "sd3" and eta > 0:
        pytest.skip("diffusers' flow scheduler has no stochastic DDIM step: test_flow_step_keeps_the_marginals")
    latents = model.initial_latents(len(PROMPTS), torch.Generator().manual_seed(0))
    with torch.no_grad():  # at eta = 1 both draw the step noise from generators seeded alike
        ours, _ = sample(model, latents, model.encode(PROMPTS), STEPS, GUIDANCE, eta, torch.Generator().manual_seed(1))
        ours_images = model.decode(ours)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(), height=RESOLUTION,
                  width=RESOLUTION, **({} if model.family == "sd3" else dict(eta=eta)))  # fmt: skip
    theirs = pipeline(PROMPTS, output_type="latent", generator=torch.Generator().manual_seed(1), **kwargs).images
    theirs_images = pipeline(PROMPTS, output_type="pt", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert ours.shape == (2, model.denoiser.config.in_channels, RESOLUTION // 2, RESOLUTION // 2)
    assert relative_error(ours, theirs) < 1e-5
    assert relative_error(ours_images, theirs_images) < 1e-5


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_equals_diffusers_step(model_and_pipeline, eta):
    """x_{t-1} and x0_hat as DDIMScheduler.step computes them from the model's output (eps, or v), with the step
    noise drawn from generators seeded alike; at every kind of step, the last one included (for SDXL, whose config
    has no set_alpha_to_one, into alphas_cumprod[0] as SD 1.x's)."""
    model, pipeline = model_and_pipeline
    if model.family == "sd3" and eta > 0:
        pytest.skip("diffusers' flow scheduler has no stochastic DDIM step: test_flow_step_keeps_the_marginals")
    schedule = model.schedule(STEPS)
    pipeline.scheduler.set_timesteps(STEPS)
    torch.manual_seed(0)
    for i in (0, 4, STEPS - 1):
        latents, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        ours = ddim_step(schedule, i, output, latents, eta, generator=torch.Generator().manual_seed(1))
        t = pipeline.scheduler.timesteps[i]
        if model.family == "sd3":
            pipeline.scheduler._step_index = i  # Euler: x_s = x_t + (sigma_s - sigma_t) u
            theirs = pipeline.scheduler.step(output, t, latents).prev_sample
        else:
            step = pipeline.scheduler.step(output, t, latents, eta, generator=torch.Generator().manual_seed(1))
            theirs = step.prev_sample
            torch.testing.assert_close(ours.pred_x0, step.pred_original_sample, rtol=1e-5, atol=1e-5)
        assert schedule.timesteps[i] == t
        torch.testing.assert_close(ours.latents, theirs, rtol=1e-5, atol=1e-5)


def test_step_mean_and_std_follow_the_formulas(model):
    """eta = 1: the mean is diffusers' step without noise, the std is DDIM's sigma of the VP path (the general
    formula of the Gaussian path reduces to it), and samples have that mean and std."""
    schedule, scheduler = model.schedule(STEPS), model.scheduler
    i, t = 3, int(schedule.timesteps[3])
    torch.manual_seed(0)
    latents, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    step = ddim_step(schedule, i, eps, latents, eta=1.0)
    abar = scheduler.alphas_cumprod
    abar_t, abar_prev = abar[t], abar[t - 1000 // STEPS]
    sigma = math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    assert step.std.item() == pytest.approx(sigma, rel=1e-5)
    assert schedule.step_std(1.0)[i].item() == pytest.approx(sigma, rel=1e-5)
    scheduler.set_timesteps(STEPS)
    no_noise = scheduler.step(eps, t, latents, eta=1.0, variance_noise=torch.zeros_like(eps)).prev_sample
    torch.testing.assert_close(step.mean, no_noise, rtol=1e-5, atol=1e-6)
    draws = torch.stack([ddim_step(schedule, i, eps, latents, eta=1.0).latents for _ in range(2000)])
    standardised = (draws - step.mean) / sigma  # (2000, 1, 4, 8, 8), N(0, 1) if mean and std are right
    assert standardised.mean().abs() < 0.01 and (standardised.std() - 1).abs() < 0.01
    assert standardised.mean(0).abs().max() < 0.15  # per dimension: 2000 draws, 256 dims, ~5 sigma


def test_the_flow_schedule_is_the_schedulers_shifted_sigmas(tiny_sd3_path):
    """SD 3's shift 3: sigma' = 3 s / (1 + 2 s) of s evenly spaced from 1 to the scheduler's smallest training sigma
    (itself shifted: 3 / 1000 / (1 + 2 / 1000)), then 0; alpha = 1 - sigma; the transformer is called with 1000 sigma.
    The last two steps, into sigma_min and into sigma = 0 (x_0), have no noise at any eta: a DDIM std of at most
    sigma_min would make the first's log-probability gradient drown every other step's in DDPO (Schedule.step_std)."""
    schedule = load_model(tiny_sd3_path, resolution=32).schedule(4)
    s = torch.linspace(1.0, 3e-3 / (1 + 2e-3), 4)
    expected = torch.cat([3 * s / (1 + 2 * s), torch.zeros(1)])
    torch.testing.assert_close(schedule.sigmas, expected)
    torch.testing.assert_close(schedule.alphas, 1 - expected)
    torch.testing.assert_close(schedule.timesteps, 1000 * expected[:-1])
    std = schedule.step_std(1.0)
    assert (std[-2:] == 0).all() and (std[:-2] > 0).all() and schedule.prediction_type == "flow"


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_flow_step_keeps_the_marginals(tiny_sd3_path, eta):
    """Given the true velocity u = eps - x0 at x_t = (1 - t) x0 + t eps, the step lands on the path's marginal at s:
    mean (1 - s) x0, std s in each dimension, whatever eta (which only splits s between the predicted eps and fresh
    noise); its std is DDIM's formula on this path, eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)."""
    schedule = load_model(tiny_sd3_path, resolution=32).schedule(6)
    x0 = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    for i in (0, 2, 4):  # the first step starts from pure noise (alpha_t = 0)
        alpha_t, sigma_t = schedule.alphas[i], schedule.sigmas[i]
        alpha_s, sigma_s = schedule.alphas[i + 1], schedule.sigmas[i + 1]
        eps = torch.randn(4000, 16, 4, 4, generator=torch.Generator().manual_seed(1))
        x_t = alpha_t * x0 + sigma_t * eps
        step = ddim_step(schedule, i, eps - x0, x_t, eta, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(step.pred_x0, x0.expand_as(x_t), rtol=1e-4, atol=1e-4)
        assert (step.latents.mean(0) - alpha_s * x0[0]).abs().max() < 5 * sigma_s / 4000**0.5
        assert abs(step.latents.std(0).mean() / sigma_s - 1) < 0.01
        ratio = alpha_t * sigma_s / (alpha_s * sigma_t)
        into_sigma_min = i == len(schedule) - 2  # deterministic at any eta (Schedule.step_std)
        expected = 0.0 if into_sigma_min else eta * sigma_s.item() * (1 - ratio.item() ** 2) ** 0.5
        assert step.std.item() == pytest.approx(expected, abs=1e-6)


def test_a_step_into_abar_one_is_deterministic(tiny_sd_path, tmp_path):
    """With set_alpha_to_one the last step lands on x0_hat itself: its std is 0 at any eta (DDPO trains only the
    steps with noise; BRAID's KL skips it), every other step keeps its noise."""
    config = DDIMScheduler.load_config(tiny_sd_path, subfolder="scheduler")
    model = load_model(tiny_sd_path)
    model.scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=True, clip_sample=False)
    std = model.schedule(4).step_std(1.0)
    assert std[-1] == 0 and (std[:-1] > 0).all()
    torch.manual_seed(0)
    latents, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    last = ddim_step(model.schedule(4), 3, eps, latents, eta=1.0)
    assert torch.equal(last.latents, last.mean) and torch.allclose(last.mean, last.pred_x0, atol=1e-6)


def lora_gradients(model, checkpointing: bool):
    """The DRaFT loop (as the scripts write it) with every step carrying gradient, at eta = 1."""
    cond = model.encode(PROMPTS)
    latents = model.initial_latents(2, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    model.denoiser.zero_grad()
    schedule = model.schedule(STEPS)
    for i, t in enumerate(schedule.timesteps):
        output = model.predict(latents, t, cond, GUIDANCE, checkpointed=checkpointing)
        latents = ddim_step(schedule, i, output, latents, eta=1.0, generator=generator).latents
    rewards = Colorfulness()(model.decode(latents, checkpointed=checkpointing))
    rewards.sum().backward()
    return rewards.detach(), [p.grad.clone() for p in model.denoiser.parameters() if p.requires_grad]


def test_checkpointing_gives_the_same_gradient(lora_model):
    rewards, grads = lora_gradients(lora_model, checkpointing=False)
    rewards_ckpt, grads_ckpt = lora_gradients(lora_model, checkpointing=True)
    torch.testing.assert_close(rewards_ckpt, rewards)
    assert all(g.abs().sum() > 0 for g in grads)  # every LoRA parameter is reached
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_pretrained_prediction_is_the_model_without_its_lora_forward_and_backward(lora_model, tiny_sd_path,
                                                                                  checkpointed):  # fmt: skip
    # BRAID's KL reference: with the LoRA switched off, also in checkpointing's recomputation in the backward pass
    # (were the switch outside the checkpointed call, the recomputed activations would be the LoRA model's)
    pretrained, cond = load_model(tiny_sd_path, resolution=RESOLUTION), lora_model.encode(PROMPTS)
    x_t = lora_model.initial_latents(2, torch.Generator().manual_seed(0))
    t, results = torch.tensor(501), []
    lora_model.denoiser.zero_grad(set_to_none=True)
    for model, flag in ((lora_model, True), (pretrained, False)):
        x = x_t.clone().requires_grad_()
        output = model.predict(x, t, cond, GUIDANCE, checkpointed, pretrained=flag)
        (output**2).sum().backward()
        results.append((output.detach(), x.grad))
    (output, grad), (output_pre, grad_pre) = results
    torch.testing.assert_close(output, output_pre)
    torch.testing.assert_close(grad, grad_pre)
    lora_grads = [p.grad for n, p in lora_model.denoiser.named_parameters() if "lora_" in n]
    assert all(g is None for g in lora_grads)  # nothing reaches the LoRA
    with torch.no_grad():  # and the LoRA is switched on again (the test's LoRA changes the prediction)
        assert not torch.allclose(lora_model.predict(x_t, t, cond, GUIDANCE), output)


def test_sample_builds_no_graph(lora_model):
    latents = lora_model.initial_latents(2, torch.Generator().manual_seed(0)).requires_grad_()
    x0, _ = sample(lora_model, latents, lora_model.encode(PROMPTS), STEPS, GUIDANCE)
    assert not x0.requires_grad


def test_same_seed_same_latents_rewards_and_gradients(lora_model):
    first, second = lora_gradients(lora_model, False), lora_gradients(lora_model, False)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    a = lora_model.initial_latents(2, torch.Generator().manual_seed(5))
    assert torch.equal(a, lora_model.initial_latents(2, torch.Generator().manual_seed(5)))


def test_trajectory_records_every_step(model):
    cond, latents = model.encode(PROMPTS), model.initial_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0, trajectory = sample(model, latents, cond, STEPS, GUIDANCE, eta=1.0, trajectory=True,
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert len(trajectory.latents) == STEPS + 1 and len(trajectory.means) == len(trajectory.stds) == STEPS
    assert trajectory.latents[0] is latents and trajectory.latents[-1] is x0
    # replaying a stored step gives the stored Gaussian (what DDPO's first PPO step sees)
    i, schedule = 3, model.schedule(STEPS)
    x_t, x_prev = trajectory.latents[i], trajectory.latents[i + 1]
    with torch.no_grad():
        output = model.predict(x_t, schedule.timesteps[i], cond, GUIDANCE)
        replay = ddim_step(schedule, i, output, x_t, eta=1.0, prev_latents=x_prev)
    torch.testing.assert_close(replay.mean, trajectory.means[i])
    assert torch.equal(replay.std, trajectory.stds[i]) and torch.equal(replay.latents, x_prev)


def test_one_step_per_sample_equals_separate_steps(model):
    """DDPO trains on a batch whose samples sit at different steps of the schedule."""
    schedule, index = model.schedule(STEPS), torch.tensor([0, 5, STEPS - 1])
    torch.manual_seed(0)
    latents, prev = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    cond = model.encode(["a cat", "a dog", "a fox"])
    with torch.no_grad():
        output = model.predict(latents, schedule.timesteps[index], cond, GUIDANCE)
        batched = ddim_step(schedule, index, output, latents, eta=1.0, prev_latents=prev)
        for row, i in enumerate(index.tolist()):
            one = slice(row, row + 1)
            output_i = model.predict(latents[one], schedule.timesteps[i], cond[one], GUIDANCE)
            single = ddim_step(schedule, i, output_i, latents[one], eta=1.0, prev_latents=prev[one])
            # a batch of 3 and of 1 take different kernels, and guidance scales their rounding up: 1.4e-5 seen on an
            # AVX2 CPU; a row at another row's step would differ by the size of the prediction itself
            torch.testing.assert_close(output[one], output_i, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.mean[one], single.mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.std[one].flatten(), single.std.view(1))


def test_the_ddim_loop_reads_nothing_back_to_the_host(model):
    """No .item() in sampling at eta 0 and 1, nor in a step with one step index per sample (DDPO's training): on
    CUDA each would stall the host until the device is done."""
    cond = model.encode(PROMPTS)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    latents = model.initial_latents(2, generators)
    schedule = model.schedule(2)
    with torch.no_grad(), torch.profiler.profile() as profile:
        for eta in (0.0, 1.0):
            sample(model, latents, cond, 2, GUIDANCE, eta, generators, trajectory=True)
        ddim_step(schedule, torch.tensor([0, 1]), latents, latents, 1.0, prev_latents=latents)
    ops = [event.key for event in profile.key_averages()]
    assert "aten::mkldnn_convolution" in ops or "aten::convolution" in ops  # the profiler saw the UNet
    assert "aten::_local_scalar_dense" not in ops  # what .item() runs


def test_the_path_kl_is_zero_for_the_pretrained_model_and_the_gaussian_kl_of_diffusers_steps(tiny_sd_path):
    """sample(kl=True): along the visited path, the sum over steps of KL(fine-tuned eta-1 step || pretrained eta-1
    step), each the mean over dims of (mean - mean_pre)^2 / (2 sigma_t^2): 0 while the LoRA is the identity, and with
    a LoRA equal to the same sum computed from diffusers' DDIMScheduler.step and its _get_variance."""
    from common.sampling import step_kl

    model, pretrained = load_model(tiny_sd_path, resolution=16), load_model(tiny_sd_path, resolution=16)
    model.add_lora(rank=4)
    cond, latents = model.encode(PROMPTS), model.initial_latents(2, torch.Generator().manual_seed(0))
    _, record = sample(model, latents, cond, 4, GUIDANCE, kl=True)
    assert torch.equal(record.kl, torch.zeros(2))
    for name, p in model.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    x0, record = sample(model, latents, cond, 4, GUIDANCE, kl=True)  # at eta 0: the deterministic path
    scheduler, x_t, expected = pretrained.scheduler, latents, torch.zeros(2)
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            output, output_pre = model.predict(x_t, t, cond, GUIDANCE), pretrained.predict(x_t, t, cond, GUIDANCE)
            zero = torch.zeros_like(x_t)
            mean = scheduler.step(output, t, x_t, eta=1.0, variance_noise=zero).prev_sample
            mean_pre = scheduler.step(output_pre, t, x_t, eta=1.0, variance_noise=zero).prev_sample
            expected += ((mean - mean_pre) ** 2).mean(dim=(1, 2, 3)) / (2 * scheduler._get_variance(t, t - 250))
            x_t = scheduler.step(output, t, x_t, eta=0.0).prev_sample
    torch.testing.assert_close(x0, x_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(record.kl, expected, rtol=1e-4, atol=1e-8)
    assert (record.kl > 0).all()
    # its gradient, for the DRaFT and DDPO penalties: against central finite differences in the model's output
    schedule, x = model.schedule(4), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    output, output_pre = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    output.requires_grad_()
    step_kl(schedule, 1, output, output_pre, x, 1.0).sum().backward()
    for index in [(0, 0, 0, 0), (0, 3, 5, 2)]:  # the KL is quadratic in the output: central differences are exact
        bump = torch.zeros_like(output).index_put_(tuple(torch.tensor([i]) for i in index), torch.tensor(1e-2))
        plus, minus = (step_kl(schedule, 1, output.detach() + s * bump, output_pre, x, 1.0) for s in (1, -1))
        assert output.grad[index].item() == pytest.approx(((plus - minus) / 2e-2).item(), rel=1e-3)
    # a step without noise (a flow model's last two, DRaFT-1's only step there) has KL 0 and a zero gradient, not nan
    output.grad = None
    step_kl(schedule, 3, output, output_pre, x, 0.0).sum().backward()
    assert torch.equal(output.grad, torch.zeros_like(output))
