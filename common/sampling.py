"""DDIM sampling with classifier-free guidance, in the notation of docs/ALGORITHMS.md:
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    mean   = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps,   x_prev = mean + sigma z
A v-prediction model (SD 2.x at 768 px) outputs v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 instead of eps; the step
first turns it into x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v and eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.
At eta = 0 this is diffusers' DDIMScheduler.step; the DDIM arithmetic runs in fp32 whatever the UNet's dtype."""

import math
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from common import fail


def randn(shape, generator=None, device="cpu") -> torch.Tensor:
    """N(0, I) noise drawn on the generator's device (the same numbers whatever `device` is) and moved to `device`.
    `generator` may be a list of one generator per sample, as in diffusers' pipelines: then each sample's noise
    comes from its own stream, whatever batch it is in (how torchrun ranks reproduce one process's batch)."""
    if isinstance(generator, list):  # drawn where the generators live, then moved in one copy (not one per sample)
        return torch.cat([randn((1, *shape[1:]), g, g.device) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)


def initial_latents(sd, batch_size: int, resolution: int, generator=None, device="cpu") -> torch.Tensor:
    """x_T ~ N(0, I), (B, 4, resolution / 8, resolution / 8) for SD (DDIM's init_noise_sigma is 1)."""
    if resolution % sd.vae_scale_factor:
        fail(f"--resolution must be a multiple of {sd.vae_scale_factor} (the VAE's downsampling), got {resolution}")
    size = resolution // sd.vae_scale_factor
    return randn((batch_size, sd.unet.config.in_channels, size, size), generator, device)


def predict_noise(unet, latents, t, prompt_embeds, negative_embeds, guidance_scale: float, checkpointed=False,
                  pretrained=False):  # fmt: skip
    """eps = eps_u + w (eps_c - eps_u) from one batched UNet call on [uncond; cond]. As in diffusers, there is
    no guidance (one call on cond) when w <= 1. `negative_embeds` may be one row; it is broadcast. `checkpointed`
    (with autograd on): keep only the inputs and recompute the UNet call in the backward pass, to save memory.
    `pretrained`: the pretrained model's prediction, from the same UNet with its LoRA switched off (inside the
    checkpointed call, so that the recomputation is the pretrained model's too).
    For a v-prediction model this is the guided v, which is the guided eps turned into v (the map is affine in v)."""
    if checkpointed and torch.is_grad_enabled():
        args = (unet, latents, t, prompt_embeds, negative_embeds, guidance_scale)
        return checkpoint(predict_noise, *args, pretrained=pretrained, use_reentrant=False)
    if pretrained:
        unet.disable_adapters()
        try:
            return predict_noise(unet, latents, t, prompt_embeds, negative_embeds, guidance_scale)
        finally:
            unet.enable_adapters()
    dtype = unet.conv_in.weight.dtype  # not unet.dtype: diffusers walks every parameter to answer that
    if guidance_scale <= 1.0:
        return unet(latents.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype)).sample.float()
    negative_embeds = negative_embeds.expand(len(latents), -1, -1)
    embeds = torch.cat([negative_embeds, prompt_embeds]).to(dtype)  # (2B, 77, D)
    t = torch.cat([t, t]) if t.ndim else t  # one timestep per sample (DDPO's shuffled timesteps) or one for all
    eps = unet(torch.cat([latents, latents]).to(dtype), t, encoder_hidden_states=embeds).sample.float()
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@dataclass
class Step:
    latents: torch.Tensor  # x_{t-1}, the sample (or the given prev_latents)
    pred_x0: torch.Tensor  # x0_hat
    mean: torch.Tensor  # mean of p(x_{t-1} | x_t)
    std: torch.Tensor  # sigma: a scalar, or (B, 1, 1, 1) for one timestep per sample
    log_prob: torch.Tensor | None  # (B,) MEAN over latent dims of log p(x_{t-1} | x_t); None at eta = 0


def ddim_step(scheduler, eps, t, latents, eta: float = 0.0, prev_latents=None, generator=None) -> Step:
    """One DDIM step from x_t, at one timestep t or one per sample (B,). `eps` is the model's output: v for a
    v-prediction model. Pass `prev_latents` to score a stored action instead of sampling one (DDPO).
    The log-prob is the mean over latent dimensions, as in DDPO's public code (its 1e-4 clip range assumes it),
    and treats x_{t-1} as data (detached)."""
    abar = scheduler.alphas_cumprod.to(latents.device)
    t = torch.as_tensor(t, device=latents.device)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    shape = (-1,) + (1,) * (latents.ndim - 1) if t.ndim else ()  # t may hold one timestep per sample: (B, 1, 1, 1)
    # indexed with 1-d tensors: indexing with a 0-d tensor reads it back to the host (.item(), a sync on CUDA)
    abar_t = abar[t.flatten()].view(shape)
    final = scheduler.final_alpha_cumprod.to(latents.device)  # abar "before" t_1: alphas_cumprod[0] for SD
    abar_prev = torch.where(prev_t >= 0, abar[prev_t.clamp(min=0).flatten()], final).view(shape)
    if scheduler.config.prediction_type == "v_prediction":
        v = eps
        pred_x0 = abar_t.sqrt() * latents - (1 - abar_t).sqrt() * v
        eps = abar_t.sqrt() * v + (1 - abar_t).sqrt() * latents
    else:
        pred_x0 = (latents - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    mean = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - std**2).sqrt() * eps
    if prev_latents is None and eta == 0:
        prev_latents = mean
    elif prev_latents is None:
        prev_latents = mean + std * randn(mean.shape, generator, mean.device)
    log_prob = None
    if eta > 0:
        log_density = (
            -((prev_latents.detach() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
        )
        log_prob = log_density.mean(dim=tuple(range(1, mean.ndim)))
    return Step(prev_latents, pred_x0, mean, std, log_prob)


def check_stochastic(scheduler, num_steps: int, method: str) -> None:
    """End the program with one sentence if a DDIM step of this scheduler has sigma = 0 at eta > 0 (abar_prev = 1 or
    abar_prev = abar_t: `set_alpha_to_one=True`, or `steps_offset=0` at the last step), where a log-prob and the
    path KL are undefined. SD 1.x and 2.x configs have none."""
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        x = torch.zeros(1, 1, 1, 1)
        if ddim_step(scheduler, x, t, x, eta=1.0, prev_latents=x).std.item() == 0:
            config = {k: scheduler.config[k] for k in ("set_alpha_to_one", "steps_offset")}
            fail(
                f"{method} needs sigma > 0 at every DDIM step, but this scheduler ({config}) has sigma = 0 at t ="
                f" {t.item()}: use a scheduler config with set_alpha_to_one false and steps_offset 1, as SD 1.x's"
            )


@dataclass
class Trajectory:
    timesteps: list = field(default_factory=list)  # t_T, ..., t_1
    latents: list = field(default_factory=list)  # x_T, ..., x_0: num_steps + 1 tensors (B, 4, h, w)
    log_probs: list = field(default_factory=list)  # per step (B,), at eta > 0


@torch.no_grad()
def sample(
    sd,
    latents,
    prompt_embeds,
    negative_embeds,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    generator=None,
    trajectory: bool = False,
):
    """DDIM from x_T = `latents` to x_0 with guidance, without gradient (evaluation, DDPO's and RWR's sampling
    rounds, BRAID's offline data; the scripts that backpropagate through the sampler write their loop inline).
    Returns x_0, and the Trajectory when asked (else None)."""
    sd.scheduler.set_timesteps(num_steps, device=latents.device)
    record = Trajectory(latents=[latents]) if trajectory else None
    for t in sd.scheduler.timesteps:
        eps = predict_noise(sd.unet, latents, t, prompt_embeds, negative_embeds, guidance_scale)
        step = ddim_step(sd.scheduler, eps, t, latents, eta, generator=generator)
        latents = step.latents
        if record:
            record.timesteps.append(t)
            record.latents.append(latents)
            record.log_probs.append(step.log_prob)
    return latents, record


def decode(sd, latents, checkpoint_vae: bool = False) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) in [0, 1], differentiable; optionally checkpointed (the VAE decoder's
    activations at 512 px are large)."""

    def vae_decode(z):
        return sd.vae.decode(z.to(sd.vae.dtype) / sd.vae.config.scaling_factor).sample.float()

    if checkpoint_vae and torch.is_grad_enabled():
        images = checkpoint(vae_decode, latents, use_reentrant=False)
    else:
        images = vae_decode(latents)
    return (images / 2 + 0.5).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str, columns: int) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> one PNG, `columns` images a row. Returns the grid, (H', W', 3) uint8."""
    from PIL import Image

    rows = -(-len(images) // columns)
    padded = torch.cat([images, images.new_zeros(rows * columns - len(images), *images.shape[1:])])
    grid = padded.view(rows, columns, *images.shape[1:]).permute(0, 3, 1, 4, 2).flatten(0, 1).flatten(1, 2)
    grid = (grid.float().clamp(0, 1) * 255).round().byte().cpu()
    Image.fromarray(grid.numpy()).save(path)
    return grid
