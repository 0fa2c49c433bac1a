"""RWR: reward-weighted regression for text-to-image diffusion, and its sparse variant, DDPO's baselines (docs/rwr.md).
Black, Janner, Du, Kostrikov and Levine, 2023, arXiv 2305.13301 (RWR after Peters and Schaal, 2007).

    python rwr.py                               # RWR, SD 1.4, aesthetic, simple animals (GPU)
    python rwr.py --sparse --reward jpeg_compressibility   # keep the top 10% of each sampling batch
    python rwr.py --preset tiny --sparse        # the shipped tiny model: a CPU run in a minute

Rounds alternate: sample N images with the current model (DDIM, eta = 0) and score them; then train on the
generated latents z_0 with the ordinary denoising loss, weighted per sample: w = N softmax(beta r) over the round
(mean weight 1), or, with --sparse, w = 1 for the samples at or above the 90th percentile of their sampling batch
and 0 otherwise. No VAE re-encode: the latents are what was sampled. Any reward works, differentiable or not.
Defaults: beta 0.2 as in DDPO's public code; optimiser and LoRA as DDPO's (unverified for RWR).
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
from common.sampling import decode, initial_latents, randn, sample, save_grid
from common.sd import SD14, add_lora, encode_prompts, load_lora, load_sd, save_lora


def rwr_weights(rewards, beta: float, sparse: bool, percentile: float, sample_batch_size: int) -> torch.Tensor:
    """RWR: N softmax(beta r) over the whole round, so the weights average 1. Sparse RWR: 1 where r is at or above
    the `percentile` of its sampling batch (the round's rewards come in batches of `sample_batch_size`), else 0."""
    if not sparse:
        return len(rewards) * torch.softmax(beta * rewards, dim=0)
    batches = rewards.view(-1, sample_batch_size)  # (num_batches, B)
    thresholds = torch.quantile(batches, percentile / 100, dim=1, keepdim=True)
    return (batches >= thresholds).float().flatten()


def denoising_loss(unet, scheduler, latents, prompt_embeds, timesteps, noise, weights) -> torch.Tensor:
    """mean_i w_i || eps_i - eps_theta(z_t, t_i, c_i) ||^2 (mean over latent dims), z_t = sqrt(abar_t) z_0 +
    sqrt(1 - abar_t) eps: the ordinary diffusion training loss, on the conditional model (no guidance). A v-prediction
    model (SD 2.x at 768 px) regresses what it was trained on instead: v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0."""
    abar = scheduler.alphas_cumprod.to(latents.device)[timesteps].view(-1, 1, 1, 1)
    noisy_latents = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise
    if scheduler.config.prediction_type == "v_prediction":
        target = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    dtype = unet.conv_in.weight.dtype  # not unet.dtype: diffusers walks every module to answer that
    output = unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype)).sample
    return (weights * ((output.float() - target) ** 2).mean(dim=(1, 2, 3))).mean()


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
    """the reward to maximise; any of them (RWR needs no gradient of it)"""
    prompts: str = "simple_animals"
    """the prompt set (simple_animals, nouns_activities, shapes)"""
    prompt_file: Optional[str] = None
    """a file of prompts, one per line, instead of --prompts"""
    num_steps: int = 50
    """DDIM sampling steps"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight"""
    eta: float = 0.0
    """DDIM eta for sampling (0: deterministic)"""
    resolution: int = 512
    """image height and width in pixels"""
    mixed_precision: Optional[Literal["bf16", "no"]] = None
    """bf16 or no (fp32) for the frozen weights; the LoRA stays fp32 (default: bf16 on CUDA, fp32 on the CPU)"""

    # Algorithm specific arguments
    sparse: bool = False
    """sparse RWR: weight 1 for the samples at or above --percentile of their sampling batch, 0 for the rest"""
    beta: float = 0.2
    """inverse temperature of the weights N softmax(beta r), in the reward's inverse units (0: uniform weights)"""
    percentile: float = 90.0
    """sparse RWR's percentile"""
    lora_rank: int = 4
    """rank of the LoRA on the UNet's attention projections"""
    learning_rate: float = 3e-4
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    num_epochs: int = 100
    """epochs; each is one sampling round and the training on it"""
    samples_per_epoch: int = 256
    """images sampled per epoch"""
    sample_batch_size: int = 8
    """images per sampling batch (sparse RWR's percentile is taken within it)"""
    train_batch_size: int = 4
    """generated latents per training batch"""
    grad_accum_steps: int = 1
    """training batches per optimizer step"""
    num_inner_epochs: int = 1
    """passes over each epoch's samples"""
    max_grad_norm: float = 1.0
    """clip the LoRA gradient to this norm"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd: coloured shapes at 32 px) on the CPU, with the
# settings of the learning test (tests/test_ddpo_rwr.py); beta 30 because the reward is in kB with a spread of ~0.07
PRESETS = {"sd14": {}, "tiny": dict(pretrained_model="assets/tiny-sd", reward="jpeg_incompressibility",
                                    prompts="shapes", resolution=32, num_steps=10, guidance_scale=1.0, num_epochs=6,
                                    samples_per_epoch=64, sample_batch_size=32, train_batch_size=32,
                                    num_inner_epochs=2, learning_rate=3e-3, beta=30.0)}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)
    check_args(args)
    check(args, "percentile", 0 <= args.percentile <= 100, "between 0 and 100")
    check(args, "beta", 0 <= args.beta < float("inf"), "at least 0 (0: uniform weights)")
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
    reward_fn = make_reward(args.reward, device, dtype)
    lora_params = add_lora(sd.unet, args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    negative_embeds = encode_prompts(sd, [""])  # (1, 77, D), the unconditional embedding, computed once
    eval_embeds = encode_prompts(sd, eval_prompts * 2)
    eval_latents = initial_latents(
        sd, len(eval_embeds), args.resolution, torch.Generator().manual_seed(args.seed), device
    )
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
        # ALGO LOGIC: sampling round with the current model; only x_0's latents are kept
        batches, generators = [], []
        with torch.no_grad():
            for _ in range(args.samples_per_epoch // args.sample_batch_size):
                # this rank's slice of the global batch: its prompts, and one generator per sample for all its noise
                batch_prompts = shard(sample_prompts(train_prompts, world_size * args.sample_batch_size, rng),
                                      args.sample_batch_size)  # fmt: skip
                batch_generators = sample_generators(args.sample_batch_size, rng)
                prompt_embeds = encode_prompts(sd, batch_prompts)  # (B, 77, D)
                latents = initial_latents(sd, args.sample_batch_size, args.resolution, batch_generators, device)  # x_T
                x0, _ = sample(sd, latents, prompt_embeds, negative_embeds, args.num_steps, args.guidance_scale,
                               args.eta, generator=batch_generators)  # fmt: skip
                batches.append({
                    "prompt_embeds": prompt_embeds,  # (B, 77, D)
                    "latents": x0,  # (B, 4, h, w): the generated z_0, the regression's data
                    "rewards": reward_fn(decode(sd, x0), batch_prompts).float(),  # (B,)
                })  # fmt: skip
                generators += batch_generators  # the training noise also comes from each sample's generator
        samples = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}  # N = samples_per_epoch

        # ALGO LOGIC: per-sample weights from the rewards of the whole round (of all ranks)
        rewards = gather(samples["rewards"])  # (world_size * N,)
        weights = rwr_weights(rewards, args.beta, args.sparse, args.percentile, args.sample_batch_size)
        local_weights = shard(weights, args.samples_per_epoch)

        # ALGO LOGIC: weighted denoising regression on the generated latents
        num_batches = args.samples_per_epoch // args.train_batch_size
        num_timesteps = sd.scheduler.config.num_train_timesteps
        losses, grad_norms = [], []
        for inner_epoch in range(args.num_inner_epochs):
            order = shuffle(args.samples_per_epoch, rng)  # (N,), a permutation of this rank's samples
            for b in range(num_batches):
                index = order[b * args.train_batch_size : (b + 1) * args.train_batch_size]
                sample_rngs = [generators[i] for i in index]  # t ~ U{0..999} and eps from each sample's generator
                timesteps = torch.cat([torch.randint(num_timesteps, (1,), generator=g) for g in sample_rngs])
                noise = randn(samples["latents"][index].shape, sample_rngs, device)
                loss = denoising_loss(sd.unet, sd.scheduler, samples["latents"][index], samples["prompt_embeds"][index],
                                      timesteps.to(device), noise, local_weights[index])  # fmt: skip
                (loss / args.grad_accum_steps).backward()
                losses.append(loss.detach())  # kept on the device and read once an epoch
                if (b + 1) % args.grad_accum_steps == 0 or b == num_batches - 1:
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
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "loss": gather(torch.stack(losses)).mean().item(),
            "effective_sample_size": (weights.sum() ** 2 / (weights**2).sum()).item(),
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
            save_checkpoint(checkpoint_dir, sd.unet, {**state, "args": asdict(args)})

    # TRY NOT TO MODIFY: the final LoRA (StableDiffusionPipeline.from_pretrained(base).load_lora_weights(run_dir))
    if rank == 0:
        save_lora(sd.unet, run_dir)
        writer.close()
        print(f"done: {run_dir}, eval reward {eval_reward}")
    cleanup()
