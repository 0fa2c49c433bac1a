"""DRaFT-LV: Directly Fine-Tuning Diffusion Models on Differentiable Rewards, low-variance K = 1 (docs/draft.md).
Clark, Vicol, Swersky and Fleet, 2023, arXiv 2309.17400 (the DRaFT-LV variant).

    python draft_lv.py --n 2                    # SD 1.4, aesthetic reward, simple animals (GPU)
    python draft_lv.py --n 2 --preset tiny      # the shipped tiny model: a CPU run in minutes

Sample x_0 with DDIM (eta = 0) without gradient; then n times: re-noise the detached x_0 to x_{t_1} with fresh
noise, take the last DDIM step again with gradient, decode and score; maximise the sum of the n rewards. The n
last steps share one sampling chain, so a step costs far less than n DRaFT-1 steps (the paper: ~10% more than one;
measured at n = 2 on tiny-sd on the CPU: 1.31x one, docs/BENCHMARKS.md).
Defaults follow the paper's small-scale setup (LoRA rank 8, AdamW lr 4e-4, weight decay 0.1, batch 4, 2k steps:
unverified against their code, which is not public); the gradient-norm clip of 1.0 is ours.
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
from common.distributed import average_gradients, cleanup, gather, sample_generators, setup, shard
from common.prompts import load_prompts, sample_prompts
from common.rewards import DIFFERENTIABLE_REWARDS, REWARDS, make_reward
from common.sampling import ddim_step, decode, initial_latents, predict_noise, randn, sample, save_grid
from common.sd import SD14, add_lora, encode_prompts, load_lora, load_sd, save_lora


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
    save_every: int = 500
    """save a checkpoint (LoRA, optimizer, step, RNG) every this many optimizer steps"""
    sample_every: int = 100
    """save a grid of fixed-seed samples on held-out prompts every this many optimizer steps"""
    resume: Optional[str] = None
    """a checkpoint folder (runs/.../checkpoints/step_000100) or a run folder (its latest checkpoint)"""

    # Model, reward and prompts
    pretrained_model: str = SD14
    """hub id or local folder of a Stable Diffusion 1.x or 2.x pipeline (epsilon or v-prediction)"""
    revision: Optional[str] = None
    """the model's revision on the hub"""
    reward: str = "aesthetic"
    """the reward to maximise; it must be differentiable"""
    prompts: str = "simple_animals"
    """the prompt set (simple_animals, nouns_activities, shapes)"""
    prompt_file: Optional[str] = None
    """a file of prompts, one per line, instead of --prompts"""
    num_steps: int = 50
    """DDIM sampling steps"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight"""
    eta: float = 0.0
    """DDIM eta (0: deterministic sampling, as in the paper)"""
    resolution: int = 512
    """image height and width in pixels"""
    mixed_precision: Optional[Literal["bf16", "no"]] = None
    """bf16 or no (fp32) for the frozen weights; the LoRA stays fp32 (default: bf16 on CUDA, fp32 on the CPU)"""

    # Algorithm specific arguments
    n: int = 2
    """re-noised copies of x_0 whose last step carries gradient"""
    lora_rank: int = 8
    """rank of the LoRA on the UNet's attention projections"""
    learning_rate: float = 4e-4
    """AdamW learning rate"""
    weight_decay: float = 0.1
    """AdamW weight decay"""
    batch_size: int = 4
    """images per micro-batch"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    train_steps: int = 2000
    """optimizer steps"""
    max_grad_norm: float = 1.0
    """clip the LoRA gradient to this norm"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd: coloured shapes at 32 px) on the CPU
PRESETS = {"sd14": {}, "tiny": dict(pretrained_model="assets/tiny-sd", reward="colorfulness", prompts="shapes",
                                    resolution=32, num_steps=20, guidance_scale=5.0, train_steps=60)}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)
    check_args(args)
    check(args, "n", args.n >= 1, "at least 1")
    if args.reward not in REWARDS:
        fail(f"unknown reward '{args.reward}'; choose one of: {', '.join(REWARDS)}")
    if not REWARDS[args.reward].differentiable:
        differentiable = ", ".join(DIFFERENTIABLE_REWARDS)
        fail(f"DRaFT needs a differentiable reward and '{args.reward}' is not; use one of: {differentiable}")
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
    reward_fn = make_reward(args.reward, device, dtype)
    lora_params = add_lora(sd.unet, args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    negative_embeds = encode_prompts(sd, [""])  # (1, 77, D), the unconditional embedding, computed once
    eval_embeds = encode_prompts(sd, eval_prompts * 2)
    eval_latents = initial_latents(
        sd, len(eval_embeds), args.resolution, torch.Generator().manual_seed(args.seed), device
    )

    # TRY NOT TO MODIFY: resuming
    start_step = 0
    if state:
        load_lora(sd.unet, resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # this command's values, which may differ from the checkpoint's
            group.update(lr=args.learning_rate, weight_decay=args.weight_decay)
        rng.set_state(state["rng"])
        start_step = state["step"]

    def evaluate(step: int) -> float:
        """Fixed-seed samples on the held-out prompts: a grid (on disk and in TensorBoard), and their mean reward."""
        x0, _ = sample(sd, eval_latents, eval_embeds, negative_embeds, args.num_steps, args.guidance_scale)
        with torch.no_grad():
            images = decode(sd, x0)
            grid = save_grid(
                images, os.path.join(run_dir, "samples", f"step_{step:06d}.png"), columns=len(eval_prompts)
            )
            writer.add_image("samples", grid, step, dataformats="HWC")
            return reward_fn(images, eval_prompts * 2).mean().item()

    eval_reward = evaluate(start_step) if start_step == 0 and rank == 0 else None
    for step in tqdm(range(start_step + 1, args.train_steps + 1), initial=start_step, total=args.train_steps,
                     disable=rank != 0):  # fmt: skip
        step_start = time.time()
        rewards_seen, loss_total = [], 0.0
        for _ in range(args.grad_accum_steps):
            # this rank's slice of the global batch: its prompts, and one generator per sample for all its noise
            batch_prompts = shard(sample_prompts(train_prompts, world_size * args.batch_size, rng), args.batch_size)
            generators = sample_generators(args.batch_size, rng)
            prompt_embeds = encode_prompts(sd, batch_prompts)  # (B, 77, D)
            latents = initial_latents(sd, args.batch_size, args.resolution, generators, device)  # x_T, (B, 4, h, w)
            # ALGO LOGIC: x_0 from the whole chain without gradient, then n re-noised copies of it at t_1:
            # x_1^i = sqrt(abar_1) x_0 + sqrt(1 - abar_1) eps_i, each taken back to x_0^i by the last DDIM step
            x0, _ = sample(sd, latents, prompt_embeds, negative_embeds, args.num_steps, args.guidance_scale, args.eta,
                           generator=generators)  # fmt: skip
            t1 = sd.scheduler.timesteps[-1]
            abar_1 = sd.scheduler.alphas_cumprod.to(device)[t1]  # t1 lives on the device
            rewards = []
            for _ in range(args.n):
                noise = randn(x0.shape, generators, device)  # a distinct eps_i for each copy
                x1 = abar_1.sqrt() * x0.detach() + (1 - abar_1).sqrt() * noise
                eps = predict_noise(sd.unet, x1, t1, prompt_embeds, negative_embeds, args.guidance_scale,
                                    checkpointed=True)  # fmt: skip
                x0_i = ddim_step(sd.scheduler, eps, t1, x1, args.eta, generator=generators).latents
                rewards.append(reward_fn(decode(sd, x0_i, checkpoint_vae=True), batch_prompts))  # (B,)
            rewards = torch.stack(rewards)  # (n, B)
            loss = -rewards.sum(0).mean() / args.grad_accum_steps  # -sum_i r(x_0^i), averaged over the batch
            loss.backward()
            rewards_seen.append(rewards.detach().flatten())
            loss_total += loss.detach()
        average_gradients(lora_params)  # the mean over ranks: every rank takes the same step
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
        if not (torch.isfinite(loss_total) and torch.isfinite(grad_norm)):
            fail(
                f"the loss or its gradient became {loss_total.item()} / {grad_norm.item()} at step {step}; stopped"
                " before the LoRA was overwritten (the last checkpoint is intact): try a lower --learning-rate"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rewards_seen = gather(torch.cat(rewards_seen))  # the global batch's, on every rank
        metrics = {
            "reward_mean": rewards_seen.mean().item(),
            "reward_std": rewards_seen.std().item() if len(rewards_seen) > 1 else 0.0,
            "loss": gather(loss_total.view(1)).mean().item(),
            "grad_norm": grad_norm.item(),
            "images_per_sec": len(rewards_seen) / (time.time() - step_start),
        }

        # TRY NOT TO MODIFY: logging, samples and checkpoints (rank 0's, with the global batch's numbers)
        if rank != 0:
            continue
        if step % args.sample_every == 0 or step == args.train_steps:
            eval_reward = evaluate(step)
        metrics = {"step": step, **metrics, "eval_reward_mean": eval_reward}
        if device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for name, value in metrics.items():
            if name != "step" and value is not None:
                writer.add_scalar(("losses/" if "loss" in name or "kl" in name else "charts/") + name, value, step)
        if step % args.save_every == 0 or step == args.train_steps:
            checkpoint_dir = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
            state = {"run_name": run_name, "step": step, "optimizer": optimizer.state_dict(), "rng": rng.get_state()}
            save_checkpoint(checkpoint_dir, sd.unet, {**state, "args": asdict(args)})

    # TRY NOT TO MODIFY: the final LoRA (StableDiffusionPipeline.from_pretrained(base).load_lora_weights(run_dir))
    if rank == 0:
        save_lora(sd.unet, run_dir)
        writer.close()
        print(f"done: {run_dir}, eval reward {eval_reward}")
    cleanup()
