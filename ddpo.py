"""DDPO: Training Diffusion Models with Reinforcement Learning, denoising as an MDP (docs/ddpo.md).
Black, Janner, Du, Kostrikov and Levine, 2023, arXiv 2305.13301.

    python ddpo.py                              # DDPO-IS, SD 1.4, aesthetic, simple animals (GPU)
    python ddpo.py --estimator sf --reward jpeg_compressibility
    python ddpo.py --preset tiny                # the shipped tiny model: a CPU run in minutes

Denoising is a T-step MDP: state (x_t, t, c), action x_{t-1}, reward r(x_0, c) at the end. Each epoch samples
images with DDIM at eta = 1, keeping every step's (x_t, x_{t-1}, log p_old); scores them; normalises the rewards
per prompt into advantages; then takes policy-gradient steps on the steps' log-probs: PPO's clipped importance
ratio (DDPO-IS) or REINFORCE (DDPO-SF). Any reward works, differentiable or not. Defaults follow the public code
ddpo-pytorch (LoRA rank 4, AdamW lr 3e-4, weight decay 1e-4, guidance 5, clip range 1e-4, 256 samples an epoch).
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from common import check, check_args, cli, fail
from common.checkpoint import find_checkpoint, open_run_dir, save_checkpoint
from common.distributed import average_gradients, cleanup, gather, sample_generators, setup, shard, shuffle
from common.prompts import load_prompts, sample_prompts
from common.rewards import REWARDS, make_reward
from common.sampling import check_stochastic, ddim_step, decode, initial_latents, predict_noise, sample, save_grid
from common.sd import SD14, add_lora, encode_prompts, load_lora, load_sd, save_lora


class PerPromptStatTracker:
    """Advantages (r - mean) / (std + 1e-6) with the mean and std of the last `buffer_size` rewards of the same
    prompt; while a prompt has fewer than `min_count`, those of the whole epoch (DDPO's public code)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # in order of first appearance
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, [])
            buffer[:] = (buffer + rewards[index].tolist())[-self.buffer_size :]
            stats = torch.tensor(buffer) if len(buffer) >= self.min_count else rewards
            advantages[index] = (rewards[index] - stats.mean()) / (stats.std(unbiased=False) + 1e-6)
        return advantages


def policy_loss(estimator: str, log_prob, old_log_prob, advantages, clip_range: float):
    """DDPO-IS: mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))), rho = exp(log p - log p_old), PPO's clipped
    surrogate; DDPO-SF: -mean(A log p). Returns the loss and rho."""
    ratio = torch.exp(log_prob - old_log_prob)
    if estimator == "sf":
        return -(advantages * log_prob).mean(), ratio
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.max(-advantages * ratio, -advantages * clipped).mean(), ratio


@dataclass
class Args:
    preset: Literal["sd14", "tiny"] = "sd14"
    """sd14: the paper's setting on SD 1.4 (a GPU); tiny: the shipped tiny model on the CPU (flags still apply)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "diffusion-reward-finetuning"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    output_dir: str = "runs"
    """the run folder is {output_dir}/{run_name}"""
    save_every: int = 10
    """save a checkpoint (LoRA, optimizer, epoch, RNG, per-prompt buffers) every this many epochs"""
    sample_every: int = 5
    """save a grid of fixed-seed samples on held-out prompts every this many epochs"""
    resume: Optional[str] = None
    """a checkpoint folder (runs/.../checkpoints/epoch_000010) or a run folder (its latest checkpoint)"""

    # Model, reward and prompts
    pretrained_model: str = SD14
    """hub id or local folder of a Stable Diffusion 1.x or 2.x pipeline (epsilon or v-prediction)"""
    revision: Optional[str] = None
    """the model's revision on the hub"""
    reward: str = "aesthetic"
    """the reward to maximise; any of them (DDPO needs no gradient of it)"""
    prompts: str = "simple_animals"
    """the prompt set (simple_animals, nouns_activities, shapes)"""
    prompt_file: Optional[str] = None
    """a file of prompts, one per line, instead of --prompts"""
    num_steps: int = 50
    """DDIM sampling steps"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight"""
    eta: float = 1.0
    """DDIM eta: 1 makes every step a Gaussian policy with a log-prob (DDPO needs eta > 0)"""
    resolution: int = 512
    """image height and width in pixels"""
    mixed_precision: Optional[Literal["bf16", "no"]] = None
    """bf16 or no (fp32) for the frozen weights; the LoRA stays fp32 (default: bf16 on CUDA, fp32 on the CPU)"""

    # Algorithm specific arguments
    estimator: Literal["is", "sf"] = "is"
    """is: DDPO-IS, PPO's clipped importance ratio; sf: DDPO-SF, REINFORCE (one gradient step per epoch)"""
    lora_rank: int = 4
    """rank of the LoRA on the UNet's attention projections"""
    learning_rate: float = 3e-4
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    num_epochs: int = 100
    """epochs; each is one sampling round and the training on it"""
    samples_per_epoch: int = 256
    """images sampled (with their trajectories) per epoch"""
    sample_batch_size: int = 8
    """images per sampling batch"""
    train_batch_size: int = 4
    """trajectories per training batch (each contributes every one of its trained timesteps)"""
    grad_accum_steps: int = 1
    """training batches per optimizer step (DDPO-SF always takes one step per epoch)"""
    num_inner_epochs: int = 1
    """passes over each epoch's samples (DDPO-IS only)"""
    clip_range: float = 1e-4
    """PPO clip range for the importance ratio (small because the log-prob is a mean over latent dims)"""
    adv_clip_max: float = 5.0
    """clip advantages to [-adv_clip_max, adv_clip_max]"""
    timestep_fraction: float = 1.0
    """fraction of each trajectory's timesteps trained on (shuffled per sample)"""
    timesteps_per_call: int = 1
    """trained timesteps of each trajectory per UNet call: the same gradient from fewer, larger calls (faster where
    a call has fixed costs, as on the CPU; activation memory grows with it)"""
    per_prompt_buffer: int = 16
    """rewards kept per prompt for its advantage statistics"""
    per_prompt_min_count: int = 16
    """below this many rewards of a prompt, normalise with the whole epoch's statistics instead"""
    max_grad_norm: float = 1.0
    """clip the LoRA gradient to this norm"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd: coloured shapes at 32 px) on the CPU, with the
# settings of the learning test (tests/test_ddpo_rwr.py; with --estimator sf it used --learning-rate 1e-2)
PRESETS = {"sd14": {}, "tiny": dict(pretrained_model="assets/tiny-sd", reward="jpeg_compressibility", prompts="shapes",
                                    resolution=32, num_steps=10, guidance_scale=5.0, num_epochs=6, samples_per_epoch=64,
                                    sample_batch_size=32, train_batch_size=16, learning_rate=3e-2)}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)
    check_args(args)
    check(args, "eta", args.eta > 0, "above 0 for DDPO, so that each denoising step has a log-probability")
    check(args, "clip_range", 0 < args.clip_range < float("inf"), "a positive number")
    check(args, "adv_clip_max", 0 < args.adv_clip_max <= float("inf"), "a positive number")
    check(args, "timestep_fraction", 0 < args.timestep_fraction <= 1, "in (0, 1]")
    check(args, "timestep_fraction", args.num_steps * args.timestep_fraction >= 1, "at least 1 / --num-steps")
    num_train_timesteps = int(args.num_steps * args.timestep_fraction)
    check(args, "timesteps_per_call", args.timesteps_per_call >= 1, "at least 1")
    check(args, "timesteps_per_call", num_train_timesteps % args.timesteps_per_call == 0,
          f"a divisor of the trained timesteps per trajectory ({num_train_timesteps})")  # fmt: skip
    check(args, "per_prompt_buffer", args.per_prompt_buffer >= 1, "at least 1")
    check(args, "per_prompt_min_count", args.per_prompt_min_count >= 1, "at least 1")
    if args.estimator == "sf" and args.num_inner_epochs != 1:
        fail("DDPO-SF is on-policy: --num-inner-epochs must be 1 with --estimator sf")
    if args.samples_per_epoch % args.sample_batch_size or args.samples_per_epoch % args.train_batch_size:
        fail("--samples-per-epoch must be a multiple of --sample-batch-size and of --train-batch-size")
    if args.reward not in REWARDS:
        fail(f"unknown reward '{args.reward}'; choose one of: {', '.join(REWARDS)}")
    prompts = load_prompts(args.prompts, args.prompt_file)
    run_name = f"{args.reward}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # TRY NOT TO MODIFY: processes, run folder, resuming, tracking, seeding
    rank, world_size, device = setup(args.cuda)  # under torchrun one process per device, otherwise rank 0 of 1
    resume_dir, state = find_checkpoint(args.resume) if args.resume else (None, None)
    # rank 0 writes the run folder, logs and checkpoints for all ranks; the folder is new, or the resumed run's
    run_dir = open_run_dir(args.output_dir, run_name, resume_dir, state, rank)
    run_name = os.path.basename(run_dir)  # suffixed if another run took the name first
    if args.track and rank == 0:
        try:
            import wandb
        except ImportError:
            fail("--track logs to Weights and Biases, which is not installed: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name,
                   id=run_name, resume="allow", sync_tensorboard=True, save_code=True)  # fmt: skip
    writer = SummaryWriter(run_dir) if rank == 0 else None
    if writer:
        writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        )
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")  # of the frozen weights
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # prompts and per-sample seeds, on the CPU: the same draws on every device and rank (each rank keeps its slice)
    rng = torch.Generator().manual_seed(args.seed)
    # 4 prompts spread through the set are held out of training and used for the sample grids
    held_out = [round((i + 0.5) * len(prompts) / 4) for i in range(4)] if len(prompts) > 4 else []
    eval_prompts = [prompts[i] for i in held_out] or prompts[:4]
    train_prompts = [p for i, p in enumerate(prompts) if i not in held_out]

    sd = load_sd(args.pretrained_model, args.revision, device, dtype, args.num_steps)
    check_stochastic(sd.scheduler, args.num_steps, "DDPO's log-prob")
    reward_fn = make_reward(args.reward, device, dtype)
    lora_params = add_lora(sd.unet, args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    negative_embeds = encode_prompts(sd, [""])  # (1, 77, D), the unconditional embedding, computed once
    eval_embeds = encode_prompts(sd, eval_prompts * 2)
    eval_latents = initial_latents(
        sd, len(eval_embeds), args.resolution, torch.Generator().manual_seed(args.seed), device
    )
    tracker = PerPromptStatTracker(args.per_prompt_buffer, args.per_prompt_min_count)
    if state:
        tracker.buffers = state["prompt_buffers"]

    # TRY NOT TO MODIFY: resuming
    start_epoch = 0
    if state:
        load_lora(sd.unet, resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # this command's values, which may differ from the checkpoint's
            group.update(lr=args.learning_rate, weight_decay=args.weight_decay)
        rng.set_state(state["rng"])
        start_epoch = state["epoch"]

    def evaluate(epoch: int) -> float:
        """Fixed-seed samples on the held-out prompts: a grid (on disk and in TensorBoard), and their mean reward."""
        x0, _ = sample(sd, eval_latents, eval_embeds, negative_embeds, args.num_steps, args.guidance_scale)
        with torch.no_grad():
            images = decode(sd, x0)
            grid = save_grid(
                images, os.path.join(run_dir, "samples", f"epoch_{epoch:06d}.png"), columns=len(eval_prompts)
            )
            writer.add_image("samples", grid, epoch, dataformats="HWC")
            return reward_fn(images, eval_prompts * 2).mean().item()

    eval_reward = evaluate(start_epoch) if start_epoch == 0 and rank == 0 else None
    for epoch in tqdm(range(start_epoch + 1, args.num_epochs + 1), initial=start_epoch, total=args.num_epochs,
                      disable=rank != 0):  # fmt: skip
        epoch_start = time.time()
        # ALGO LOGIC: sampling round, with eta > 0 so that every step is a Gaussian policy with a log-prob
        batches, prompts_seen = [], []
        with torch.no_grad():
            for _ in range(args.samples_per_epoch // args.sample_batch_size):
                # this rank's slice of the global batch: its prompts, and one generator per sample for all its noise
                batch_prompts = shard(sample_prompts(train_prompts, world_size * args.sample_batch_size, rng),
                                      args.sample_batch_size)  # fmt: skip
                generators = sample_generators(args.sample_batch_size, rng)
                prompt_embeds = encode_prompts(sd, batch_prompts)  # (B, 77, D)
                latents = initial_latents(sd, args.sample_batch_size, args.resolution, generators, device)  # x_T
                x0, trajectory = sample(sd, latents, prompt_embeds, negative_embeds, args.num_steps,
                                        args.guidance_scale, args.eta, generators, trajectory=True)  # fmt: skip
                batches.append({
                    "prompt_embeds": prompt_embeds,  # (B, 77, D)
                    "latents": torch.stack(trajectory.latents, dim=1),  # (B, T + 1, 4, h, w): x_T ... x_0
                    "log_probs": torch.stack(trajectory.log_probs, dim=1),  # (B, T): log p_old of each step
                    "rewards": reward_fn(decode(sd, x0), batch_prompts).float(),  # (B,)
                })  # fmt: skip
                prompts_seen += batch_prompts
        samples = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}  # N = samples_per_epoch
        del batches  # else the trajectories are held twice through the training (0.86 GB at SD 1.4's defaults)
        timesteps = sd.scheduler.timesteps  # (T,), t_T ... t_1, set by sample()

        # ALGO LOGIC: advantages, normalised per prompt over the whole round (of all ranks), then clipped
        rewards = gather(samples["rewards"])  # (world_size * N,)
        advantages = tracker.update(gather(prompts_seen), rewards.cpu()).to(device)
        advantages = shard(advantages.clamp(-args.adv_clip_max, args.adv_clip_max), args.samples_per_epoch)

        # ALGO LOGIC: policy-gradient steps on the stored transitions (x_t, x_{t-1}), timesteps shuffled per sample
        num_batches = args.samples_per_epoch // args.train_batch_size
        batches_per_update = num_batches if args.estimator == "sf" else args.grad_accum_steps  # SF: one step an epoch
        losses, approx_kls, clipfracs, grad_norms = [], [], [], []
        for inner_epoch in range(args.num_inner_epochs):
            order = shuffle(args.samples_per_epoch, rng)  # (N,), a permutation of this rank's samples
            step_order = [torch.randperm(args.num_steps, generator=rng) for _ in range(world_size * len(order))]
            step_order = shard(
                torch.stack(step_order), len(order)
            )  # (N, T): for each of this rank's samples, its order of steps
            # drawn on the CPU (the same draws on every device), indexing on the device: one copy, not one per step
            order, step_order = order.to(device), step_order.to(device)
            for b in range(num_batches):
                index = order[b * args.train_batch_size : (b + 1) * args.train_batch_size]
                for j in range(0, num_train_timesteps, args.timesteps_per_call):
                    step_index = step_order[index, j : j + args.timesteps_per_call]  # (B, J): its next J steps
                    rows = index[:, None].expand_as(step_index).flatten()  # (B J,): each trajectory J times
                    step_index = step_index.flatten()  # (B J,)
                    t = timesteps[step_index]
                    x_t, x_prev = samples["latents"][rows, step_index], samples["latents"][rows, step_index + 1]
                    eps = predict_noise(sd.unet, x_t, t, samples["prompt_embeds"][rows], negative_embeds,
                                        args.guidance_scale)  # fmt: skip
                    log_prob = ddim_step(sd.scheduler, eps, t, x_t, args.eta, prev_latents=x_prev).log_prob  # (B J,)
                    old_log_prob = samples["log_probs"][rows, step_index]
                    loss, ratio = policy_loss(args.estimator, log_prob, old_log_prob, advantages[rows], args.clip_range)
                    # the mean over this call's J steps, weighted as J of the num_train_timesteps
                    (loss * args.timesteps_per_call / (num_train_timesteps * batches_per_update)).backward()
                    # kept on the device and read once an epoch: no host-device sync per UNet call
                    losses.append(loss.detach())
                    approx_kls.append(0.5 * ((log_prob - old_log_prob) ** 2).mean().detach())
                    clipfracs.append(((ratio - 1.0).abs() > args.clip_range).float().mean())
                if (b + 1) % batches_per_update == 0 or b == num_batches - 1:
                    average_gradients(lora_params)  # the mean over ranks: every rank takes the same step
                    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
                    if not (torch.isfinite(losses[-1]) and torch.isfinite(grad_norm)):
                        fail(
                            f"the loss or its gradient became {losses[-1].item()} / {grad_norm.item()} at epoch"
                            f" {epoch}; stopped before the LoRA was overwritten (the last checkpoint is intact): try a"
                            " lower --learning-rate"
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    grad_norms.append(grad_norm)
        losses, approx_kls, clipfracs = (gather(torch.stack(x)) for x in (losses, approx_kls, clipfracs))
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "loss": losses.mean().item(),
            "approx_kl": approx_kls.mean().item(),
            "clipfrac": clipfracs.mean().item(),
            "grad_norm": torch.stack(grad_norms).mean().item(),
            "images_per_sec": len(rewards) / (time.time() - epoch_start),
        }

        # TRY NOT TO MODIFY: logging, samples and checkpoints (rank 0's, with the global batch's numbers)
        if rank != 0:
            continue
        if epoch % args.sample_every == 0 or epoch == args.num_epochs:
            eval_reward = evaluate(epoch)
        metrics = {"epoch": epoch, **metrics, "eval_reward_mean": eval_reward}
        if device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for name, value in metrics.items():
            if name != "epoch" and value is not None:
                writer.add_scalar(("losses/" if "loss" in name or "kl" in name else "charts/") + name, value, epoch)
        if epoch % args.save_every == 0 or epoch == args.num_epochs:
            checkpoint_dir = os.path.join(run_dir, "checkpoints", f"epoch_{epoch:06d}")
            state = {"run_name": run_name, "epoch": epoch, "optimizer": optimizer.state_dict(), "rng": rng.get_state()}
            save_checkpoint(checkpoint_dir, sd.unet, {**state, "args": asdict(args), "prompt_buffers": tracker.buffers})

    # TRY NOT TO MODIFY: the final LoRA (StableDiffusionPipeline.from_pretrained(base).load_lora_weights(run_dir))
    if rank == 0:
        save_lora(sd.unet, run_dir)
        writer.close()
        print(f"done: {run_dir}, eval reward {eval_reward}")
    cleanup()
