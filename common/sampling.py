"""The sampler: one DDIM step for every Gaussian path x_t = alpha_t x0 + sigma_t eps (docs/ALGORITHMS.md, section 1).
    x0_hat, eps_hat from the network's output: eps (SD), v = alpha eps - sigma x0 (SD 2.x at 768 px), or the velocity
                    u = eps - x0 of a rectified flow (SD 3, alpha = 1 - sigma)
    std    = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)   (DDIM's sigma, from t to the less noisy s)
    mean   = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat,   x_s = mean + std z
At eta = 0 this is diffusers' DDIMScheduler.step on SD's path and FlowMatchEulerDiscreteScheduler.step on a flow's;
at eta > 0 each step is a Gaussian with the same marginals, whose mean and std DDPO's log-prob and BRAID's KL use.
On a flow's path, `flow_grpo_step` is the other Gaussian step in use, Flow-GRPO's (docs/ALGORITHMS.md, 1.10).
The arithmetic runs in fp32 whatever the denoiser's dtype."""

from dataclasses import dataclass, field

import torch


def randn(shape, generator=None, device="cpu") -> torch.Tensor:
    """N(0, I) noise drawn on the generator's device (the same numbers whatever `device` is) and moved to `device`.
    `generator` may be a list of one generator per sample, as in diffusers' pipelines: then each sample's noise
    comes from its own stream, whatever batch it is in (how torchrun ranks reproduce one process's batch)."""
    if isinstance(generator, list):  # drawn where the generators live, then moved in one copy (not one per sample)
        return torch.cat([randn((1, *shape[1:]), g, g.device) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)


@dataclass
class Schedule:
    """T sampling steps on the model's path: step i goes from timesteps[i] (alphas[i], sigmas[i]) to the less noisy
    alphas[i + 1], sigmas[i + 1]; the last entry is where sampling ends (SD: alphas_cumprod[0]; a flow: x0 itself).
    `timesteps` are what the denoiser is called with: SD's integer t, a flow's 1000 sigma."""

    timesteps: torch.Tensor  # (T,)
    alphas: torch.Tensor  # (T + 1,) fp32
    sigmas: torch.Tensor  # (T + 1,) fp32
    prediction_type: str  # "epsilon", "v_prediction" or "flow" (the velocity eps - x0)
    floor: float = 0.0  # a step into sigma <= floor is deterministic at any eta (a flow's sigma_min: step_std)

    def __len__(self) -> int:
        return len(self.timesteps)

    def to(self, device) -> "Schedule":
        tensors = (x.to(device) for x in (self.timesteps, self.alphas, self.sigmas))
        return Schedule(*tensors, self.prediction_type, self.floor)

    def noiseless_tail(self) -> int:
        """How many steps at the end of the schedule carry no noise at any eta (a flow's last two, SD's into abar = 1
        where the config has one): no policy, no KL there."""
        return int((self.step_std(1.0) == 0).flip(0).cumprod(0).sum())

    def step_std(self, eta: float) -> torch.Tensor:
        """(T,): each step's std at this eta; 0 where a step is deterministic: into sigma = 0 (a flow's x0, SD's
        abar = 1), and on a flow's path also into its scheduler's sigma_min (`floor`), the step before x0, whose DDIM
        std (at most sigma_min, 0.001 to 0.009) would make its log-probability's gradient, which scales as 1 / std,
        drown every other step's in DDPO and its KL every other's (docs/ALGORITHMS.md, 1.7)."""
        ratio = self.alphas[:-1] * self.sigmas[1:] / (self.alphas[1:] * self.sigmas[:-1])
        std = eta * self.sigmas[1:] * (1 - ratio**2).clamp(min=0).sqrt()
        return torch.where(self.sigmas[1:] > self.floor, std, torch.zeros_like(std))

    def flow_grpo_std(self, a: float) -> torch.Tensor:
        """(T,): the std of each of Flow-GRPO's steps at noise level `a` (flow_grpo_step); every step has noise at
        a > 0, the last (into x_0) too."""
        sigma, sigma_s = self.sigmas[:-1], self.sigmas[1:]
        capped = torch.where(sigma == 1, self.sigmas[1], sigma)  # sigma / (1 - sigma) is infinite at sigma = 1
        return a * (sigma / (1 - capped)).sqrt() * (sigma - sigma_s).sqrt()


@dataclass
class Step:
    latents: torch.Tensor  # x_s, the sample (or the given prev_latents)
    pred_x0: torch.Tensor  # x0_hat
    mean: torch.Tensor  # mean of p(x_s | x_t)
    std: torch.Tensor  # its std: a scalar, or (B, 1, 1, 1) for one step index per sample


def ddim_step(schedule: Schedule, i, output, latents, eta: float = 0.0, prev_latents=None, generator=None) -> Step:
    """Step i of the schedule (an int, or a (B,) tensor: one step per sample, as DDPO trains) from x_t = `latents`,
    given the network's `output`. Pass `prev_latents` to score a stored action instead of sampling one (DDPO)."""
    shape = (-1,) + (1,) * (latents.ndim - 1) if torch.is_tensor(i) and i.ndim else ()
    if torch.is_tensor(i):  # indexed on the schedule's device: no value is read back to the host (a sync on CUDA)
        i = i.to(schedule.alphas.device)
    alpha_t, sigma_t = schedule.alphas[i].view(shape), schedule.sigmas[i].view(shape)
    alpha_s, sigma_s = schedule.alphas[i + 1].view(shape), schedule.sigmas[i + 1].view(shape)
    output, latents = output.float(), latents.float()
    if schedule.prediction_type == "epsilon":
        eps = output
        pred_x0 = (latents - sigma_t * eps) / alpha_t
    elif schedule.prediction_type == "v_prediction":  # v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1
        pred_x0 = alpha_t * latents - sigma_t * output
        eps = alpha_t * output + sigma_t * latents
    else:  # flow: u = eps - x0, with alpha = 1 - sigma
        pred_x0 = latents - sigma_t * output
        eps = latents + alpha_t * output
    ratio = alpha_t * sigma_s / (alpha_s * sigma_t)
    std = eta * sigma_s * (1 - ratio**2).clamp(min=0).sqrt()
    std = torch.where(sigma_s > schedule.floor, std, torch.zeros_like(std))  # Schedule.step_std says why
    mean = alpha_s * pred_x0 + (sigma_s**2 - std**2).clamp(min=0).sqrt() * eps
    if prev_latents is None:
        prev_latents = mean if eta == 0 else mean + std * randn(mean.shape, generator, mean.device)
    return Step(prev_latents, pred_x0, mean, std)


def flow_grpo_step(schedule: Schedule, i, output, latents, eta: float = 0.7, prev_latents=None, generator=None) -> Step:
    """Flow-GRPO's step (Liu et al., 2025, arXiv 2505.05470) on a flow's path, with `eta` its noise level a: the
    Euler-Maruyama step of the SDE that has the flow's marginals, from sigma_t to sigma_s (dt = sigma_s - sigma_t < 0)
        s    = a sqrt(sigma_t / (1 - sigma_t))            (sigma_t = 1 read as the next sigma in the denominator)
        mean = x_t (1 + s^2 dt / (2 sigma_t)) + u (1 + s^2 (1 - sigma_t) / (2 sigma_t)) dt,   std = s sqrt(-dt)
    At a = 0 it is the Euler step, ddim_step at eta 0. The same arguments as ddim_step, so either is the sampler."""
    shape = (-1,) + (1,) * (latents.ndim - 1) if torch.is_tensor(i) and i.ndim else ()
    if torch.is_tensor(i):
        i = i.to(schedule.sigmas.device)
    sigma, sigma_s = schedule.sigmas[i].view(shape), schedule.sigmas[i + 1].view(shape)
    output, latents = output.float(), latents.float()
    dt = sigma_s - sigma
    s = eta * (sigma / (1 - torch.where(sigma == 1, schedule.sigmas[1], sigma))).sqrt()
    mean = latents * (1 + s**2 / (2 * sigma) * dt) + output * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * (-dt).sqrt()
    if prev_latents is None:
        prev_latents = mean if eta == 0 else mean + std * randn(mean.shape, generator, mean.device)
    return Step(prev_latents, latents - sigma * output, mean, std)


SAMPLERS = {"ddim": ddim_step, "flow_grpo": flow_grpo_step}


def step_kl(schedule: Schedule, i, output, output_ref, latents, eta: float, step=ddim_step) -> torch.Tensor:
    """KL(p(. | x_t) || p_ref(. | x_t)) of step i at this eta, for the model's `output` and a reference's (the
    pretrained model's) from the same x_t: two Gaussians of the same std, so ||mean - mean_ref||^2 / (2 std^2), taken
    as the MEAN over latent dimensions (the scale of DDPO's log-prob). (B,); 0 where the step has no noise (its KL
    is not defined: a deterministic step is not a policy). `step`: the sampler's step function (SAMPLERS)."""
    mean_ref = step(schedule, i, output_ref, latents, eta, prev_latents=latents).mean
    step = step(schedule, i, output, latents, eta, prev_latents=latents)  # prev_latents: no noise drawn
    variance = step.std.flatten() ** 2
    noisy = variance > 0  # without noise, divide by 1: the gradient through where's unused branch would be 0 x inf
    kl = ((step.mean - mean_ref) ** 2).mean(dim=tuple(range(1, latents.ndim))) / (2 * torch.where(noisy, variance, 1))
    return torch.where(noisy, kl, torch.zeros_like(kl))


@dataclass
class Trajectory:
    latents: list = field(default_factory=list)  # x_T, ..., x_0: T + 1 tensors (B, C, h, w)
    means: list = field(default_factory=list)  # each step's Gaussian: T means (B, C, h, w) ...
    stds: list = field(default_factory=list)  # ... and T stds (0-d)
    kl: torch.Tensor | None = None  # (B,) with kl=True: the path's KL from the pretrained model, summed over steps


@torch.no_grad()
def sample(
    model,
    latents,
    cond,
    num_steps: int,
    guidance_scale: float,
    eta: float | list[float] = 0.0,
    generator=None,
    trajectory: bool = False,
    kl: bool = False,
    step=ddim_step,
):
    """DDIM from x_T = `latents` to x_0 with guidance, without gradient (evaluation, DDPO's and RWR's sampling rounds,
    BRAID's offline data; the scripts that backpropagate through the sampler write their loop inline). Returns x_0,
    and the Trajectory when asked (else None). `kl`: also the pretrained model's output at every x_t visited, and the
    sum over steps of the KL between the two models' eta-1 steps (step_kl): how far the fine-tuned sampler has moved
    from the pretrained one along this path, whatever eta it is sampled at. `eta` may be one per step (DDPO's window
    of noisy steps); `step` is the sampler's step function (SAMPLERS: DDIM's, or Flow-GRPO's with eta its a)."""
    etas = eta if isinstance(eta, list) else [eta] * num_steps
    schedule = model.schedule(num_steps)
    record = Trajectory(latents=[latents]) if trajectory or kl else None
    if kl:
        record.kl = torch.zeros(len(latents), device=latents.device)
    for i, t in enumerate(schedule.timesteps):
        output = model.predict(latents, t, cond, guidance_scale)
        if kl:
            output_pre = model.predict(latents, t, cond, guidance_scale, pretrained=True)
            record.kl += step_kl(schedule, i, output, output_pre, latents, 1.0)
        taken = step(schedule, i, output, latents, etas[i], generator=generator)
        latents = taken.latents
        if trajectory:
            record.latents.append(latents)
            record.means.append(taken.mean)
            record.stds.append(taken.std)
    return latents, record
