"""DDPO: Training Diffusion Models with Reinforcement Learning, denoising as an MDP (docs/ddpo.md).
Black, Janner, Du, Kostrikov and Levine, 2023, arXiv 2305.13301.

    python ddpo.py                              # DDPO-IS, SD 1.4, aesthetic, simple animals (GPU)
    python ddpo.py --estimator sf --reward jpeg_compressibility
    python ddpo.py --preset tiny                # the shipped tiny model: a CPU run in minutes
    python ddpo.py --pretrained-model stabilityai/stable-diffusion-3.5-medium --reward hpsv2 --group-size 8 \
        --sampler flow_grpo --eta 0.7 --sde-window 2 --no-train-guidance --ema-decay 0.9   # Flow-GRPO's recipes

Denoising is a T-step MDP: state (x_t, t, c), action x_{t-1}, reward r(x_0, c) at the end. Each epoch samples
images with DDIM at eta = 1, keeping every step's (x_t, x_{t-1}, log p_old); scores them; normalises the rewards
per prompt into advantages; then takes policy-gradient steps on the steps' log-probs: PPO's clipped importance
ratio (DDPO-IS) or REINFORCE (DDPO-SF). Any reward works, differentiable or not. Defaults follow the public code
ddpo-pytorch (LoRA rank 4, AdamW lr 3e-4, weight decay 1e-4, guidance 5, clip range 1e-4, 256 samples an epoch).
Flow-GRPO (Liu et al., 2025, arXiv 2505.05470) is this loop with group advantages and its recipes as flags: its own
noisy step, a window of noisy steps (the rest deterministic), sampling and training without guidance, an EMA.
"""

import common.startup  # noqa: F401  (first: Ctrl-C while the libraries load ends in one line)

# isort: split
import math
import time
from dataclasses import dataclass
from typing import Literal, Union

import torch

from common.cli import check, cli, fail
from common.distributed import gather, sample_generators, shard, shuffle
from common.flags import AtLeast0, AtLeast1, Count, Eta, Guidance, LearningRate, LoraRank, Positive, Resumable, RunArgs
from common.lora import EMA
from common.models import Conditioning, load_model
from common.prompts import load_prompts, sample_prompts, split_prompts
from common.rewards import RewardName, Scorer, make_reward
from common.run import Run
from common.sampling import SAMPLERS, sample, step_kl


class PerPromptStatTracker:
    """Advantages (r - mean) / (std + 1e-6) with the mean and std of the last `buffer_size` rewards of the same
    prompt; while a prompt has fewer than `min_count`, those of the whole epoch (DDPO's public code)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}

    def state_dict(self) -> dict:  # what a checkpoint keeps, so that a resumed run normalises as this one would
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = state["buffers"]

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # in order of first appearance
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, [])
            buffer[:] = (buffer + rewards[index].tolist())[-self.buffer_size :]
            stats = torch.tensor(buffer) if len(buffer) >= self.min_count else rewards
            advantages[index] = (rewards[index] - stats.mean()) / (stats.std(unbiased=False) + 1e-6)
        return advantages


def log_prob(prev_latents, mean, std) -> torch.Tensor:
    """log p(x_{t-1} | x_t) of a step's Gaussian, (B,): the MEAN over the latent dimensions, as DDPO's public code
    takes it (a per-dimension log-likelihood, so the importance ratio of a whole step stays near 1: that is why the
    PPO clip range is 1e-4, where a sum over SD's 16384 dimensions would need another). x_{t-1} is the sampled action,
    data to score (detached)."""
    log_density = -((prev_latents.detach() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return log_density.mean(dim=tuple(range(1, mean.ndim)))


def policy_loss(estimator: str, log_prob, old_log_prob, advantages, clip_range: float):
    """DDPO-IS: mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))), rho = exp(log p - log p_old), PPO's clipped
    surrogate; DDPO-SF: -mean(A log p). Returns the loss and rho."""
    ratio = torch.exp(log_prob - old_log_prob)
    if estimator == "sf":
        return -(advantages * log_prob).mean(), ratio
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.max(-advantages * ratio, -advantages * clipped).mean(), ratio


@dataclass
class Args(RunArgs):  # RunArgs (common/flags.py): the flags every script shares, then these
    save_every: Resumable[AtLeast1] = 10
    """save a checkpoint (LoRA, optimizer, epoch, RNG, per-prompt buffers) every this many epochs"""
    sample_every: Resumable[AtLeast1] = 5
    """save a grid of fixed-seed samples on held-out prompts every this many epochs"""
    guidance_scale: Guidance = 5.0
    """classifier-free guidance weight (FLUX.1-dev: its guidance input, 3.5 in its pipeline; FLUX.1-schnell: none)"""
    reward: Union[RewardName, str] = "aesthetic"
    """the reward to maximise (DDPO needs no gradient of it): a name, your own path.py:Name, or a weighted sum such
    as aesthetic+0.2*colorfulness"""
    eta: Eta = 1.0
    """the steps' noise, DDIM's eta (1: every step a Gaussian policy with a log-prob; DDPO needs > 0) or, with
    --sampler flow_grpo, Flow-GRPO's noise level a (0.7 in its code)"""
    sampler: Literal["ddim", "flow_grpo"] = "ddim"
    """ddim: DDIM's step at --eta; flow_grpo: Flow-GRPO's SDE step (flow models: SD 3, FLUX.1, Qwen-Image)"""
    sde_window: int = 0
    """W > 0: only W consecutive steps of each round are noisy, and only they are trained; the others deterministic
    (Flow-GRPO-Fast, MixGRPO); 0: every step that can be"""
    window_placement: Literal["random", "sliding"] = "random"
    """the window's place each round: drawn at random, or one step later each epoch from the first, wrapping round"""
    train_guidance: bool = True
    """--no-train-guidance: sample and train without classifier-free guidance, one denoiser call a step instead of
    two (evaluations keep --guidance-scale)"""
    ema_decay: float = 0.0
    """> 0: evaluate with an exponential moving average of the LoRA at this decay, saved in ema/ beside it
    (Flow-GRPO: 0.9)"""
    async_reward: bool = True
    """score each sampling batch in a worker thread while the next one samples (--no-async-reward: in turn; the
    rewards are the same)"""

    # Algorithm specific arguments
    estimator: Literal["is", "sf"] = "is"
    """is: DDPO-IS, PPO's clipped importance ratio; sf: DDPO-SF, REINFORCE (one gradient step per epoch)"""
    lora_rank: LoraRank = 4
    """rank of the LoRA on the denoiser's attention projections"""
    learning_rate: Resumable[LearningRate] = 3e-4
    """AdamW learning rate"""
    weight_decay: Resumable[AtLeast0] = 1e-4
    """AdamW weight decay"""
    num_epochs: Resumable[Count] = 100
    """epochs; each is one sampling round and the training on it"""
    samples_per_epoch: Count = 256
    """images sampled (with their trajectories) per epoch"""
    sample_batch_size: Count = 8
    """images per sampling batch"""
    train_batch_size: Count = 4
    """trajectories per training batch (each contributes every one of its trained timesteps)"""
    grad_accum_steps: Count = 1
    """training batches per optimizer step (DDPO-SF always takes one step per epoch)"""
    num_inner_epochs: Count = 1
    """passes over each epoch's samples (DDPO-IS only)"""
    clip_range: Positive = 1e-4
    """PPO clip range for the importance ratio (small because the log-prob is a mean over latent dims: log_prob)"""
    adv_clip_max: float = 5.0
    """clip advantages to [-adv_clip_max, adv_clip_max]"""
    timestep_fraction: float = 1.0
    """fraction of each trajectory's stochastic steps trained on (shuffled per sample)"""
    timesteps_per_call: int = 1
    """trained steps of a trajectory per denoiser call: the same gradient from fewer, larger calls (more memory)"""
    per_prompt_buffer: AtLeast1 = 16
    """rewards kept per prompt for its advantage statistics"""
    per_prompt_min_count: AtLeast1 = 16
    """below this many rewards of a prompt, normalise with the whole epoch's statistics instead"""
    group_size: int = 1
    """G > 1: G samples of each prompt drawn, rewards normalised within their group of this round (GRPO)"""
    max_grad_norm: Resumable[Positive] = 1.0
    """clip the LoRA gradient to this norm"""
    kl_weight: AtLeast0 = 0.0
    """weight of the per-step KL to the pretrained policy in the loss (DPOK, Flow-GRPO; 0: none, DDPO as published)"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd: coloured shapes at 32 px) on the CPU, with the
# settings of the learning test (tests/test_ddpo_rwr.py; with --estimator sf it used --learning-rate 1e-2)
PRESETS = {
    "sd14": {},
    "tiny": dict(
        pretrained_model="assets/tiny-sd", cpu_threads=1, reward="jpeg_compressibility", prompts="shapes",
        resolution=32, num_steps=10, guidance_scale=5.0, num_epochs=6, samples_per_epoch=64, sample_batch_size=32,
        train_batch_size=16, learning_rate=3e-2,
    ),
}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)  # --help, --preset, --resume's own flags; each flag's allowed values checked
    check(args, "eta", args.eta > 0, "above 0 for DDPO, so that each denoising step has a log-probability")
    check(args, "adv_clip_max", 0 < args.adv_clip_max <= float("inf"), "a positive number")
    check(args, "timestep_fraction", 0 < args.timestep_fraction <= 1, "in (0, 1]")
    check(args, "ema_decay", 0 <= args.ema_decay < 1, "in [0, 1)")
    check(args, "timestep_fraction", args.num_steps * args.timestep_fraction >= 1, "at least 1 / --num-steps")
    check(args, "samples_per_epoch", args.samples_per_epoch >= 2, "at least 2: advantages compare rewards")
    divisor = args.group_size >= 1 and args.sample_batch_size % args.group_size == 0
    check(args, "group_size", divisor, "at least 1 and a divisor of --sample-batch-size")
    if args.estimator == "sf" and args.num_inner_epochs != 1:
        fail("DDPO-SF is on-policy: --num-inner-epochs must be 1 with --estimator sf")
    if args.samples_per_epoch % args.sample_batch_size or args.samples_per_epoch % args.train_batch_size:
        fail("--samples-per-epoch must be a multiple of --sample-batch-size and of --train-batch-size")
    train_prompts, eval_prompts = split_prompts(load_prompts(args.prompts, args.prompt_file), args.validation_prompts)

    # TRY NOT TO MODIFY: processes and seeds, the model and the reward (common/run.py, common/models.py)
    run = Run(args, "DDPO (Black et al., 2023)", name=args.reward, counter="epoch", end=args.num_epochs)
    model = load_model(
        args.pretrained_model, args.revision, run.device, run.dtype, args.resolution, args.num_steps, t5=args.t5
    )
    if args.free_text_encoders:
        model.free_text_encoders(train_prompts + eval_prompts)
    if args.gradient_checkpointing:
        model.checkpoint_blocks()
    reward_fn = make_reward(args.reward, run.device, run.dtype)

    scorer = Scorer(reward_fn, background=args.async_reward)  # each batch scored while the next one samples

    # ALGO LOGIC: the MDP's actions are the steps with noise. A step without any is not a policy: SD's into abar = 1
    # where the config ends there, and with DDIM's step a flow model's last two (Schedule.step_std says why).
    # Flow-GRPO's last step, into x_0, has noise but a std near sigma_min (0.006 on SD 3.5): not trained (nor in its
    # code).
    if args.sampler == "flow_grpo" and not model.flow:
        fail("--sampler flow_grpo is a flow model's step (SD 3, FLUX.1, Qwen-Image); this model is not one: use ddim")
    schedule, step_fn = model.schedule(args.num_steps), SAMPLERS[args.sampler]
    stds = schedule.step_std(args.eta) if args.sampler == "ddim" else schedule.flow_grpo_std(args.eta)
    policy_steps = ((stds > 0) & (schedule.sigmas[1:] > 0)).nonzero().flatten()  # (S,) step indices
    if len(policy_steps) == 0:
        fail(f"no step of this model's {args.num_steps}-step schedule has noise at --eta {args.eta}: raise --num-steps")
    window = args.sde_window or len(policy_steps)  # each round's noisy steps, the ones trained
    check(args, "sde_window", 0 <= args.sde_window <= len(policy_steps), f"0 to the {len(policy_steps)} noisy steps")
    num_train_timesteps = max(1, int(window * args.timestep_fraction))
    # the guidance of the sampling rounds and of training: --guidance-scale's, or none (a distilled model's input)
    guidance = args.guidance_scale if args.train_guidance else model.training_guidance(args.guidance_scale)
    divides = args.timesteps_per_call >= 1 and num_train_timesteps % args.timesteps_per_call == 0
    check(args, "timesteps_per_call", divides, f"a divisor of the steps trained per trajectory ({num_train_timesteps})")

    # ALGO LOGIC: each prompt's recent rewards, the statistics of its advantages (kept in every checkpoint)
    tracker = PerPromptStatTracker(args.per_prompt_buffer, args.per_prompt_min_count)

    # TRY NOT TO MODIFY: the LoRA and its optimizer; the run folder, new or --resume's (common/run.py)
    lora_params = model.add_lora(args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    ema = EMA(lora_params, args.ema_decay) if args.ema_decay else None  # common/lora.py
    start_epoch = run.start(
        model, optimizer, reward_fn, eval_prompts, method_state={"prompt_buffers": tracker}, ema=ema
    )

    for epoch in run.steps(start_epoch):
        epoch_start = time.time()
        # ALGO LOGIC: this round's noisy steps, the ones trained: every policy step, or a window of W of them, drawn
        # at random each round or sliding one step each epoch, with every other step deterministic.
        steps, etas = policy_steps.tolist(), [args.eta] * args.num_steps
        if args.sde_window:
            places = len(policy_steps) - window + 1
            if args.window_placement == "random":
                first = int(torch.randint(places, (), generator=run.rng))
            else:
                first = (epoch - 1) % places
            steps = steps[first : first + window]
            etas = [args.eta if i in steps else 0.0 for i in range(args.num_steps)]
        round_steps = torch.tensor(steps, device=run.device)  # (W,), on the device for indexing
        # ALGO LOGIC: a sampling round, with eta > 0 so that every noisy step is a Gaussian policy with a log-prob.
        batches, conds, prompts_seen = [], [], []
        for _ in range(args.samples_per_epoch // args.sample_batch_size):
            # This process's slice of the global batch: its prompts, and one generator per sample for all its noise.
            drawn = sample_prompts(train_prompts, run.world_size * args.sample_batch_size // args.group_size, run.rng)
            prompts = shard([p for p in drawn for _ in range(args.group_size)], args.sample_batch_size)  # G each
            generators = sample_generators(args.sample_batch_size, run.rng)
            cond = model.encode(prompts)
            latents = model.initial_latents(args.sample_batch_size, generators)  # x_T
            x0, trajectory = sample(
                model, latents, cond, args.num_steps, guidance, etas, generators, trajectory=True, step=step_fn
            )
            log_probs = [log_prob(trajectory.latents[j + 1], trajectory.means[j], trajectory.stds[j]) for j in steps]
            batch = {
                "latents": torch.stack(trajectory.latents, dim=1),  # (B, T + 1, C, h, w): x_T ... x_0
                "log_probs": torch.stack(log_probs, dim=1),  # (B, S): log p_old of each policy step
                "rewards": scorer.submit(model.decode(x0), prompts),  # (B,), once the worker has scored them
            }
            batches.append(batch)
            conds.append(cond)
            prompts_seen += prompts
        for batch in batches:  # the round's rewards, each batch's scored while the next one sampled
            batch["rewards"] = batch["rewards"].result()
        samples = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}  # N = samples_per_epoch
        samples["cond"] = Conditioning.cat(conds)
        del batches, conds  # else the trajectories are held twice through the training (0.86 GB at SD 1.4's defaults)

        # ALGO LOGIC: advantages, the rewards normalised per prompt: over the whole round (of all processes) and the
        # prompt's recent rounds (DDPO's tracker), or with groups over the prompt's group(s) of this round only (GRPO).
        rewards = gather(samples["rewards"])  # (world_size * N,)
        normalise = tracker if args.group_size == 1 else PerPromptStatTracker(len(rewards), min_count=1)
        advantages = normalise.update(gather(prompts_seen), rewards.cpu()).to(run.device)
        advantages = shard(advantages.clamp(-args.adv_clip_max, args.adv_clip_max), args.samples_per_epoch)

        # ALGO LOGIC: policy-gradient steps on the stored transitions (x_t, x_{t-1}), each sample's steps shuffled.
        num_batches = args.samples_per_epoch // args.train_batch_size
        batches_per_update = num_batches if args.estimator == "sf" else args.grad_accum_steps  # SF: one step an epoch
        losses, approx_kls, clipfracs, kls, grad_norms = [], [], [], [], []
        for inner_epoch in range(args.num_inner_epochs):
            order = shuffle(args.samples_per_epoch, rng=run.rng)  # (N,), a permutation of this process's samples
            draws = [torch.randperm(len(steps), generator=run.rng) for _ in range(len(order) * run.world_size)]
            step_order = shard(torch.stack(draws), len(order))  # (N, S): the order of each sample's steps
            # Drawn on the CPU, so that every device makes the same draws; moved once, so that indexing with them
            # needs no copy per step.
            order, step_order = order.to(run.device), step_order.to(run.device)
            for b in range(num_batches):
                index = order[b * args.train_batch_size : (b + 1) * args.train_batch_size]
                for j in range(0, num_train_timesteps, args.timesteps_per_call):
                    position = step_order[index, j : j + args.timesteps_per_call].flatten()  # (B J,): its next J
                    rows = index[:, None].expand(-1, args.timesteps_per_call).flatten()  # (B J,): each sample J times
                    step_index = round_steps[position]  # (B J,) indices into the schedule
                    x_t, x_prev = samples["latents"][rows, step_index], samples["latents"][rows, step_index + 1]
                    t, cond = schedule.timesteps[step_index], samples["cond"][rows]
                    output = model.predict(x_t, t, cond, guidance)
                    step = step_fn(schedule, step_index, output, x_t, args.eta, prev_latents=x_prev)
                    new_log_prob = log_prob(x_prev, step.mean, step.std)
                    old_log_prob = samples["log_probs"][rows, position]
                    loss, ratio = policy_loss(
                        args.estimator, new_log_prob, old_log_prob, advantages[rows], args.clip_range
                    )
                    if args.kl_weight:  # the KL to the pretrained policy, exact between Gaussians (docs/ddpo.md)
                        pre = model.predict(x_t, t, cond, guidance, pretrained=True)  # LoRA off: no graph
                        kl = step_kl(schedule, step_index, output, pre, x_t, args.eta, step_fn).mean()
                        loss, kls = loss + args.kl_weight * kl, kls + [kl.detach()]
                    # the mean over this call's J steps, weighted as J of the num_train_timesteps
                    (loss * args.timesteps_per_call / (num_train_timesteps * batches_per_update)).backward()
                    # kept on the device and read once an epoch: no host-device sync per denoiser call
                    losses.append(loss.detach())
                    approx_kls.append(0.5 * ((new_log_prob - old_log_prob) ** 2).mean().detach())
                    clipfracs.append(((ratio - 1.0).abs() > args.clip_range).float().mean())
                if (b + 1) % batches_per_update == 0 or b == num_batches - 1:
                    # The optimizer step. check_gradients averages the gradients over torchrun's processes and ends
                    # the run with one sentence, before the LoRA is overwritten, if a loss or gradient is not finite.
                    run.check_gradients(losses[-1])
                    grad_norms.append(torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema:
                        ema.update()
        losses, approx_kls, clipfracs = (gather(torch.stack(x)) for x in (losses, approx_kls, clipfracs))
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "loss": losses.mean().item(),
            "approx_kl": approx_kls.mean().item(),
            "clipfrac": clipfracs.mean().item(),
            "kl": gather(torch.stack(kls)).mean().item() if kls else None,
            "grad_norm": torch.stack(grad_norms).mean().item(),
            "images_per_sec": len(rewards) / (time.time() - epoch_start),
        }
        run.log(epoch, metrics)  # TRY NOT TO MODIFY: metrics, grids, checkpoints

    run.finish()  # TRY NOT TO MODIFY: the final LoRA
