"""BRAID: Bridging Model-Based Optimization and Generative Modeling via Conservative Fine-Tuning (docs/braid.md).
Uehara, Zhao, Hajiramezanali, Scalia, Eraslan, Lal, Levine and Biancalani, 2024, arXiv 2405.19673.

    python braid.py --labeler aesthetic --offline-size 1024 --offline-quantile 0.5     # synthesised data (GPU)
    python braid.py --offline-data my_images/ --conservatism bonus     # a folder of images with scores.csv
    python braid.py --preset tiny               # the shipped tiny model: a CPU run in minutes

Offline: no reward function, only a static dataset of (image, score). "Doubly conservative": (1) a reward model on
frozen image features, penalised away from the data (a bootstrap ensemble's mean minus c times its spread, or one
head minus c times an uncertainty bonus), and (2) a KL penalty to the pretrained model. Fine-tuning backpropagates
r_c(x_0) - alpha KL through the sampler (eta = 1) into the LoRA, as DRaFT does, with the path KL
sum_t ||mean_theta(x_t) - mean_pre(x_t)||^2 / (2 sigma_t^2) (mean over latent dims; mean_pre: the LoRA switched off).
--c 0 is the non-conservative baseline (STRL in the paper). Optimiser and KL weight: SEIKO's numbers (the authors'
code), not its reward scale (docs/braid.md); c and KL weight kept after a sweep (docs/RESULTS.md); unverified at scale.
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from common import check, check_args, cli, fail
from common.checkpoint import find_checkpoint, open_run_dir, save_checkpoint
from common.distributed import average_gradients, cleanup, gather, sample_generators, setup, shard
from common.offline_data import offline_dataset, offline_features
from common.prompts import load_prompts, sample_prompts
from common.rewards import REWARDS, ImageFeatures, make_reward
from common.sampling import check_stochastic, ddim_step, decode, initial_latents, predict_noise, sample, save_grid
from common.sd import SD14, add_lora, encode_prompts, load_lora, load_sd, save_lora


class RewardHead(nn.Module):
    """The LAION aesthetic MLP's shape (no activations); also returns the 16 penultimate features."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                  nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16))  # fmt: skip
        self.out = nn.Linear(16, 1)

    def forward(self, features):
        penultimate = self.body(features)  # (B, 16)
        return self.out(penultimate).squeeze(-1), penultimate


def fit_head(features, scores, steps: int, lr: float, generator) -> RewardHead:
    """Least squares with Adam on minibatches of 128, on standardised scores (whatever the reward's scale), folded
    back into the last layer afterwards; returns the head in eval mode."""
    head = RewardHead(features.shape[1]).to(features.device)
    mean, std = scores.mean(), scores.std() + 1e-8
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(len(features), (min(128, len(features)),), generator=generator).to(features.device)
        loss = F.mse_loss(head(features[index])[0], (scores[index] - mean) / std)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # predict scores, not standardised scores
        head.out.weight.mul_(std)
        head.out.bias.mul_(std).add_(mean)
    return head.eval().requires_grad_(False)


class ConservativeReward(nn.Module):
    """boot: r_c = mean_m r_m - c std_m over heads fitted on bootstrap resamples of the data. bonus: r_c = r_hat -
    c sqrt(f^T (Sigma + lambda I)^-1 f), f the head's penultimate features and Sigma = sum_i f_i f_i^T over the
    data (the linear-bandit confidence width: it shrinks like 1/sqrt(N) on the data and grows away from it).
    Returns (r_c, the un-penalised proxy reward)."""

    def __init__(self, heads, c: float, features=None, bonus_lambda: float = 1e-3):
        super().__init__()
        self.heads, self.c = nn.ModuleList(heads), c
        if len(heads) == 1:  # bonus
            f = heads[0](features)[1].double()  # (N, 16); float64: Sigma is ill-conditioned when N >> 16
            sigma = f.T @ f + bonus_lambda * torch.eye(f.shape[1], device=f.device, dtype=f.dtype)
            self.register_buffer("sigma_inv", torch.linalg.inv(sigma))

    def forward(self, features):
        if len(self.heads) > 1:
            predictions = torch.stack([head(features)[0] for head in self.heads])  # (M, B)
            proxy = predictions.mean(0)
            return proxy - self.c * predictions.std(0), proxy
        proxy, f = self.heads[0](features)
        bonus = ((f.double() @ self.sigma_inv) * f.double()).sum(-1).clamp(min=0).sqrt().float()
        return proxy - self.c * bonus, proxy


def sample_with_kl(sd, latents, prompt_embeds, negative_embeds, num_steps, guidance_scale, eta, k, generator):
    """DDIM at eta > 0 from x_T = `latents`, the last k steps with gradient (as DRaFT-K), and over those steps the
    path KL of the module docstring, mean_pre from the same UNet with its LoRA off, on the same x_t (which carries
    the gradient of the earlier steps) and with the same guidance. Returns x_0 and the KL, (B,)."""
    sd.scheduler.set_timesteps(num_steps, device=latents.device)
    kl = torch.zeros(len(latents), device=latents.device)
    for i, t in enumerate(sd.scheduler.timesteps):
        with torch.set_grad_enabled(i >= num_steps - k):
            eps = predict_noise(sd.unet, latents, t, prompt_embeds, negative_embeds, guidance_scale, checkpointed=True)
            step = ddim_step(sd.scheduler, eps, t, latents, eta, generator=generator)
            if torch.is_grad_enabled():
                eps_pre = predict_noise(sd.unet, latents, t, prompt_embeds, negative_embeds, guidance_scale,
                                        checkpointed=True, pretrained=True)  # fmt: skip
                mean_pre = ddim_step(sd.scheduler, eps_pre, t, latents, eta, prev_latents=step.latents).mean
                kl = kl + ((step.mean - mean_pre) ** 2).mean(dim=(1, 2, 3)) / (2 * step.std**2)
        latents = step.latents
    return latents, kl


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
    save_every: int = 100
    """save a checkpoint (LoRA, optimizer, step, RNG) every this many optimizer steps"""
    sample_every: int = 50
    """save a grid of fixed-seed samples on held-out prompts every this many optimizer steps"""
    resume: Optional[str] = None
    """a checkpoint folder (runs/.../checkpoints/step_000100) or a run folder (its latest checkpoint)"""

    # Model, reward and prompts
    pretrained_model: str = SD14
    """hub id or local folder of a Stable Diffusion 1.x or 2.x pipeline (epsilon or v-prediction)"""
    revision: Optional[str] = None
    """the model's revision on the hub"""
    prompts: str = "simple_animals"
    """the prompt set (simple_animals, nouns_activities, shapes)"""
    prompt_file: Optional[str] = None
    """a file of prompts, one per line, instead of --prompts"""
    num_steps: int = 50
    """DDIM sampling steps"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight"""
    eta: float = 1.0
    """DDIM eta: 1 makes every step Gaussian, so that the path KL to the pretrained model is defined"""
    resolution: int = 512
    """image height and width in pixels"""
    mixed_precision: Optional[Literal["bf16", "no"]] = None
    """bf16 or no (fp32) for the frozen weights; the LoRA stays fp32 (default: bf16 on CUDA, fp32 on the CPU)"""

    # Algorithm specific arguments
    offline_data: Optional[str] = None
    """a folder of images with a scores.csv of file,score lines, or a .pt file (docs/braid.md); default: synthesised"""
    offline_size: int = 1024
    """synthesised data: images sampled from the pretrained model"""
    labeler: str = "aesthetic"
    """synthesised data: the reward that labels it (the 'true' reward, logged as true_reward_mean)"""
    label_noise: float = 0.1
    """synthesised data: scores are labeler + label_noise * N(0, 1)"""
    offline_quantile: float = 1.0
    """synthesised data: keep only the scores below this quantile, so that extrapolation matters"""
    feature_model: str = "openai/clip-vit-large-patch14"
    """frozen image features for the reward model: a CLIP id or path, or 'vae'"""
    conservatism: Literal["boot", "bonus"] = "boot"
    """boot: bootstrap ensemble, mean - c std; bonus: one head minus c times an uncertainty bonus"""
    c: float = 1.0
    """strength of the reward model's conservatism (0: the non-conservative baseline)"""
    ensemble_size: int = 4
    """boot: heads in the ensemble"""
    bonus_lambda: float = 1e-3
    """bonus: ridge added to the penultimate features' Gram matrix"""
    reward_model_steps: int = 1000
    """Adam steps fitting each reward head"""
    reward_model_lr: float = 1e-3
    """Adam learning rate of the reward heads"""
    val_fraction: float = 0.1
    """part of the offline data held out to measure the reward model's error"""
    kl_weight: float = 0.01
    """alpha, the weight of the path KL to the pretrained model"""
    k: Optional[int] = None
    """backpropagate through the last K steps only (default: all)"""
    lora_rank: int = 4
    """rank of the LoRA on the UNet's attention projections"""
    learning_rate: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 0.1
    """AdamW weight decay"""
    batch_size: int = 4
    """images per micro-batch"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    train_steps: int = 500
    """optimizer steps"""
    max_grad_norm: float = 5.0
    """clip the LoRA gradient to this norm"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd) on the CPU, its VAE's features (no CLIP download)
PRESETS = {"sd14": {}, "tiny": dict(pretrained_model="assets/tiny-sd", labeler="colorfulness", prompts="shapes",
                                    feature_model="vae", resolution=32, num_steps=20, guidance_scale=5.0,
                                    offline_size=256, offline_quantile=0.5, train_steps=40)}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)
    check_args(args)
    args.k = args.k or args.num_steps
    check(args, "k", 1 <= args.k <= args.num_steps, f"between 1 and --num-steps ({args.num_steps})")
    check(args, "eta", args.eta > 0, "above 0 for BRAID, so that every step is Gaussian and the path KL defined")
    check(args, "c", 0 <= args.c < float("inf"), "at least 0 (0: the non-conservative baseline)")
    check(args, "kl_weight", 0 <= args.kl_weight < float("inf"), "at least 0")
    check(args, "label_noise", 0 <= args.label_noise < float("inf"), "at least 0")
    check(args, "offline_quantile", 0 < args.offline_quantile <= 1, "in (0, 1]")
    check(args, "reward_model_lr", 0 < args.reward_model_lr <= 1, "in (0, 1]")
    check(args, "val_fraction", 0 < args.val_fraction < 1, "in (0, 1)")
    check(args, "bonus_lambda", 0 < args.bonus_lambda < float("inf"), "above 0 (it keeps Sigma invertible)")
    if args.offline_data is None and args.labeler not in REWARDS:
        fail(f"unknown labeler '{args.labeler}'; choose one of: {', '.join(REWARDS)}")
    if args.conservatism == "boot" and args.ensemble_size < 2:
        fail("--conservatism boot needs --ensemble-size of at least 2")
    prompts = load_prompts(args.prompts, args.prompt_file)
    run_name = f"{'offline' if args.offline_data else args.labeler}__{args.exp_name}__{args.seed}__{int(time.time())}"

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
    check_stochastic(sd.scheduler, args.num_steps, "BRAID's path KL")
    negative_embeds = encode_prompts(sd, [""])  # (1, 77, D), the unconditional embedding, computed once

    # the offline dataset: --offline-data, or images of the pretrained model scored by the labeler plus noise (the
    # labeler's reward is logged as the true one); common/offline_data.py reads, synthesises and checks it
    labeler = make_reward(args.labeler, device, dtype) if args.offline_data is None else None
    data, source = offline_dataset(args, run_dir, sd, labeler, train_prompts, negative_embeds)

    # ALGO LOGIC: the conservative reward model on frozen features, with a held-out split for its error
    featurize = ImageFeatures(args.feature_model, sd.vae).to(device)
    model_rng = torch.Generator().manual_seed(args.seed + 2)  # the split, the resamples, the heads' minibatches
    features, scores, val, train = offline_features(data, source, featurize, args, model_rng)
    if args.conservatism == "boot":
        resamples = [train[torch.randint(len(train), (len(train),), generator=model_rng).to(device)]
                     for _ in range(args.ensemble_size)]  # fmt: skip
    else:
        resamples = [train]
    heads = [fit_head(features[i], scores[i], args.reward_model_steps, args.reward_model_lr, model_rng)
             for i in resamples]  # fmt: skip
    conservative = ConservativeReward(heads, args.c, features[train], args.bonus_lambda).to(device)
    labels = data.get("true_rewards", data["scores"])  # the offline data's true rewards where known
    best, median = labels.max().item(), labels.median().item()
    with torch.no_grad():
        val_mse = F.mse_loss(conservative(features[val])[1], scores[val]).item()
    if rank == 0:
        torch.save(conservative.state_dict(), os.path.join(run_dir, "reward_model.pt"))
        print(f"reward model: validation MSE {val_mse:.4g}; offline data: best {best:.4g}, median {median:.4g}")

    def reward_fn(images, prompts=None):
        return conservative(featurize(images))[0]

    lora_params = add_lora(sd.unet, args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
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
        x0, _ = sample(sd, eval_latents, eval_embeds, negative_embeds, args.num_steps, args.guidance_scale, args.eta,
                       generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
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
        rewards_seen, proxies_seen, true_seen, kls_seen, loss_total = [], [], [], [], 0.0
        for _ in range(args.grad_accum_steps):
            # this rank's slice of the global batch: its prompts, and one generator per sample for all its noise
            batch_prompts = shard(sample_prompts(train_prompts, world_size * args.batch_size, rng), args.batch_size)
            generators = sample_generators(args.batch_size, rng)
            prompt_embeds = encode_prompts(sd, batch_prompts)  # (B, 77, D)
            latents = initial_latents(sd, args.batch_size, args.resolution, generators, device)  # x_T, (B, 4, h, w)
            # ALGO LOGIC: backpropagation through the last K steps at eta = 1, with their path KL; conservative reward
            x0, kl = sample_with_kl(sd, latents, prompt_embeds, negative_embeds, args.num_steps, args.guidance_scale,
                                    args.eta, args.k, generators)  # fmt: skip
            images = decode(sd, x0, checkpoint_vae=True)
            rewards, proxy_rewards = conservative(featurize(images))  # (B,) each
            loss = (-rewards + args.kl_weight * kl).mean() / args.grad_accum_steps
            loss.backward()
            rewards_seen.append(rewards.detach())
            proxies_seen.append(proxy_rewards.detach())
            kls_seen.append(kl.detach())
            if labeler is not None:  # on detached images: no graph
                true_seen.append(labeler(images.detach(), batch_prompts))
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
        rewards_seen, proxies_seen, kls_seen = (gather(torch.cat(x)) for x in (rewards_seen, proxies_seen, kls_seen))
        true_seen = gather(torch.cat(true_seen)) if true_seen else None
        metrics = {
            "reward_mean": rewards_seen.mean().item(),
            "reward_std": rewards_seen.std().item() if len(rewards_seen) > 1 else 0.0,
            "proxy_reward_mean": proxies_seen.mean().item(),
            "kl": kls_seen.mean().item(),
            "true_reward_mean": true_seen.mean().item() if true_seen is not None else None,
            "offline_best": best,
            "offline_median": median,
            "reward_model_val_mse": val_mse,
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
