"""BRAID: Bridging Model-Based Optimization and Generative Modeling via Conservative Fine-Tuning of Diffusion Models.
Uehara, Zhao, Hajiramezanali, Scalia, Eraslan, Lal, Levine and Biancalani, 2024, arXiv 2405.19673.

    python braid.py --labeler aesthetic --offline-size 1024 --offline-quantile 0.5     # synthesised data (GPU)
    python braid.py --offline-data my_images/ --conservatism bonus     # a folder of images with scores.csv
    python braid.py --pretrained-model assets/tiny-sd --labeler colorfulness --prompts shapes --feature-model vae \
        --resolution 32 --num-steps 20 --offline-size 256 --train-steps 40 --batch-size 4   # a CPU run in minutes

Offline: no reward function, only a static dataset of (image, score). "Doubly conservative": (1) a reward model on
frozen image features, penalised away from the data (a bootstrap ensemble's mean minus c times its spread, or
one head minus c times an uncertainty bonus), and (2) a KL penalty to the pretrained model. Fine-tuning
backpropagates r_c(x_0) - alpha KL through the sampler (eta = 1) into the LoRA, as DRaFT does. The path KL is
sum_t ||mean_theta(x_t) - mean_pre(x_t)||^2 / (2 sigma_t^2), mean over latent dims, with mean_pre from the UNet with
its LoRA disabled. --c 0 is the non-conservative baseline (STRL in the paper). Defaults follow the group's sibling
code SEIKO (AdamW lr 1e-3, weight decay 0.1, grad clip 5, KL weight 0.01, guidance 7.5; unverified for BRAID).

Offline data (--offline-data): a folder of images with a scores.csv of `file,score` lines, or a .pt file holding
{"scores": (N,)} and either {"images": uint8 (N, 3, H, W)} or {"features": (N, D)} already computed with the
--feature-model. Without it, the data is synthesised and cached as {run folder}/offline_data.pt (same format).
"""
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPModel

from common import check_positive, fail, load_or_fail
from common.distributed import average_gradients, cleanup, gather, sample_generators, setup, shard
from common.prompts import load_prompts, sample_prompts
from common.rewards import REWARDS, make_reward, processor_preprocess
from common.sampling import ddim_step, decode, initial_latents, predict_noise, sample, save_grid
from common.sd import SD14, add_lora, encode_prompts, load_lora, load_sd, save_lora


class ImageFeatures(nn.Module):
    """Frozen, differentiable image features: L2-normalised CLIP image embeddings (as the aesthetic predictor
    uses), or "vae": the pipeline's own VAE latents average-pooled to 4 x 4 (no extra download)."""

    def __init__(self, feature_model: str, vae):
        super().__init__()
        self.vae = vae if feature_model == "vae" else None
        if self.vae is None:
            self.clip = load_or_fail(CLIPModel.from_pretrained, feature_model).requires_grad_(False).eval()
            self.processor = load_or_fail(CLIPImageProcessor.from_pretrained, feature_model)

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, D)
        if self.vae is not None:
            latents = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mean.float()
            return F.adaptive_avg_pool2d(latents * self.vae.config.scaling_factor, 4).flatten(1)  # (B, 4 * 16)
        pixels = processor_preprocess(self.processor, images).to(self.clip.dtype)
        embeds = self.clip.get_image_features(pixel_values=pixels).pooler_output.float()
        return embeds / embeds.norm(dim=-1, keepdim=True)


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


def path_kl(sd, trajectory, steps, prompt_embeds, negative_embeds, guidance_scale: float, eta: float):
    """sum over `steps` of ||mean_theta(x_t) - mean_pre(x_t)||^2 / (2 sigma_t^2), the mean over latent dims, (B,).
    mean_theta comes from the trajectory; mean_pre from the same UNet with its LoRA switched off, on the same x_t
    (which carries the gradient of the earlier steps) and with the same guidance. Its UNet calls are checkpointed."""

    def predict_noise_pretrained(*args):
        sd.unet.disable_adapters()  # inside the checkpointed function, so the recomputation is pretrained too
        try:
            return predict_noise(*args)
        finally:
            sd.unet.enable_adapters()

    kl = 0.0
    for i in steps:
        t, x_t = trajectory.timesteps[i], trajectory.latents[i]
        eps_pre = checkpoint(predict_noise_pretrained, sd.unet, x_t, t, prompt_embeds, negative_embeds, guidance_scale,
                             use_reentrant=False)  # fmt: skip
        mean_pre = ddim_step(sd.scheduler, eps_pre, t, x_t, eta).mean
        kl = kl + ((trajectory.means[i] - mean_pre) ** 2).mean(dim=(1, 2, 3)) / (2 * trajectory.stds[i] ** 2)
    return kl


def load_offline_data(path: str, resolution: int) -> dict:
    """A folder of images with scores.csv (file,score), or a .pt file as the module docstring describes."""
    if os.path.isfile(path) and path.endswith(".pt"):
        data = torch.load(path, weights_only=False)
        if "scores" not in data or not ("images" in data or "features" in data):
            fail(f"{path} must hold 'scores' and either 'images' (uint8, N x 3 x H x W) or 'features' (N x D)")
        return data
    table = os.path.join(path, "scores.csv")
    if not os.path.isfile(table):
        fail(f"--offline-data {path} is neither a .pt file nor a folder with a scores.csv of file,score lines")
    with open(table, newline="") as f:
        rows = [row for row in csv.DictReader(f)]
    if not rows or not {"file", "score"} <= set(rows[0]):
        fail(f"{table} needs a header line 'file,score' and at least one row")
    images = [np.asarray(Image.open(os.path.join(path, row["file"])).convert("RGB").resize((resolution, resolution)))
              for row in rows]  # fmt: skip
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    return {"images": images, "scores": torch.tensor([float(row["score"]) for row in rows])}


@dataclass
class Args:
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
    """hub id or local folder of a Stable Diffusion 1.x pipeline"""
    revision: Optional[str] = None
    """the model's revision on the hub"""
    reward: str = "conservative"
    """BRAID maximises its own learned, conservative reward: use --labeler for the synthesised data's labels"""
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
    mixed_precision: Literal["bf16", "no"] = "bf16"
    """dtype of the frozen weights on CUDA (the LoRA stays fp32); the CPU always uses fp32"""

    # Algorithm specific arguments
    offline_data: Optional[str] = None
    """offline dataset (see the docstring); without it, one is synthesised with --labeler"""
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


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_positive(args, "resolution", "num_steps", "offline_size", "batch_size", "grad_accum_steps")
    args.k = args.k or args.num_steps
    if not 1 <= args.k <= args.num_steps:
        fail(f"--k must be between 1 and --num-steps ({args.num_steps}), got {args.k}")
    if args.eta <= 0:
        fail(f"BRAID's path KL needs --eta > 0 so that every step is Gaussian, got {args.eta}")
    if args.offline_data is None and args.labeler not in REWARDS:
        fail(f"unknown labeler '{args.labeler}'; choose one of: {', '.join(REWARDS)}")
    if args.conservatism == "boot" and args.ensemble_size < 2:
        fail("--conservatism boot needs --ensemble-size of at least 2")
    prompts = load_prompts(args.prompts, args.prompt_file)
    # 4 prompts spread through the set are held out of training and used for the sample grids
    held_out = [round((i + 0.5) * len(prompts) / 4) for i in range(4)] if len(prompts) > 4 else []
    eval_prompts = [prompts[i] for i in held_out] or prompts[:4]
    train_prompts = [p for i, p in enumerate(prompts) if i not in held_out]

    # TRY NOT TO MODIFY: processes, run folder, resuming, tracking, seeding
    rank, world_size, device = setup(args.cuda)  # under torchrun one process per device, otherwise rank 0 of 1
    state = None
    if args.resume:
        path = args.resume
        if not os.path.isfile(os.path.join(path, "state.pt")) and os.path.isdir(os.path.join(path, "checkpoints")):
            steps = sorted(os.listdir(os.path.join(path, "checkpoints")))
            path = os.path.join(path, "checkpoints", steps[-1]) if steps else path
        if not os.path.isfile(os.path.join(path, "state.pt")):
            fail(f"--resume {args.resume} is neither a checkpoint folder nor a run folder with checkpoints")
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    run_name = state["run_name"] if state else f"{args.reward}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(os.path.dirname(path)) if state else os.path.join(args.output_dir, run_name)
    if rank == 0:  # rank 0 writes the run folder, logs and checkpoints for all ranks
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    if args.track and rank == 0:
        try:
            import wandb
        except ImportError:
            fail("--track logs to Weights and Biases, which is not installed: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name,
                   id=run_name, resume="allow", sync_tensorboard=True)  # fmt: skip
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir) if rank == 0 else None
        if writer:
            writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    except ImportError:  # tensorboard is optional: metrics.jsonl has everything
        writer = None

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if device.type == "cpu" and rank == 0:
        print("note: no CUDA device, running on the CPU: SD 1.4 will be very slow there (try --pretrained-model assets/tiny-sd)")
    dtype = torch.bfloat16 if device.type == "cuda" and args.mixed_precision == "bf16" else torch.float32
    # prompts and per-sample seeds, on the CPU: the same draws on every device and rank (each rank keeps its slice)
    rng = torch.Generator().manual_seed(args.seed)

    sd = load_sd(args.pretrained_model, args.revision, device, dtype)
    negative_embeds = encode_prompts(sd, [""])  # (1, 77, D), the unconditional embedding, computed once

    # ALGO LOGIC: the offline dataset, from a file or synthesised by the pretrained model and a noisy labeler
    cache = os.path.join(run_dir, "offline_data.pt")
    labeler = make_reward(args.labeler, device, dtype) if args.offline_data is None else None
    if args.offline_data is None and not os.path.isfile(cache):
        data_rng = torch.Generator().manual_seed(args.seed + 1)
        images, true_rewards, data_prompts = [], [], []
        global_batch = world_size * args.batch_size  # under torchrun each rank samples its slice of every batch
        with torch.no_grad():
            for _ in tqdm(range(math.ceil(args.offline_size / global_batch)), desc="synthesising offline data",
                          disable=rank != 0):  # fmt: skip
                batch_prompts = sample_prompts(train_prompts, global_batch, data_rng)
                generators = sample_generators(args.batch_size, data_rng)
                latents = initial_latents(sd, args.batch_size, args.resolution, generators, device)
                x0, _ = sample(sd, latents, encode_prompts(sd, shard(batch_prompts, args.batch_size)), negative_embeds,
                               args.num_steps, args.guidance_scale, args.eta, generator=generators)  # fmt: skip
                batch_images = decode(sd, x0)
                true_rewards.append(gather(labeler(batch_images, shard(batch_prompts, args.batch_size))).cpu())
                images.append(gather((batch_images * 255).round().byte()).cpu())
                data_prompts += batch_prompts
        true_rewards = torch.cat(true_rewards)[: args.offline_size].float()
        scores = true_rewards + args.label_noise * torch.randn(len(true_rewards), generator=data_rng)
        keep = scores <= torch.quantile(scores, args.offline_quantile)  # only the low part: extrapolation matters
        data = {"images": torch.cat(images)[: args.offline_size][keep], "scores": scores[keep],
                "true_rewards": true_rewards[keep], "prompts": [p for p, kept in zip(data_prompts, keep) if kept]}  # fmt: skip
        if rank == 0:
            torch.save(data, cache)  # a resumed run reads the same data
    else:
        data = load_offline_data(cache if args.offline_data is None else args.offline_data, args.resolution)

    # ALGO LOGIC: the conservative reward model on frozen features, with a held-out split for its error
    featurize = ImageFeatures(args.feature_model, sd.vae).to(device)
    with torch.no_grad():
        if "features" in data:
            features = data["features"].float().to(device)
        else:
            features = torch.cat([featurize(batch.to(device).float() / 255) for batch in data["images"].split(32)])
    scores = data["scores"].float().to(device)
    if len(scores) < 10:
        fail(f"the offline data has {len(scores)} scored examples; the reward model needs at least 10")
    model_rng = torch.Generator().manual_seed(args.seed + 2)
    order = torch.randperm(len(scores), generator=model_rng)
    num_val = max(1, int(args.val_fraction * len(scores)))
    val, train = order[:num_val].to(device), order[num_val:].to(device)
    if args.conservatism == "boot":
        resamples = [train[torch.randint(len(train), (len(train),), generator=model_rng).to(device)]
                     for _ in range(args.ensemble_size)]  # fmt: skip
    else:
        resamples = [train]
    heads = [fit_head(features[i], scores[i], args.reward_model_steps, args.reward_model_lr, model_rng) for i in resamples]
    conservative = ConservativeReward(heads, args.c, features[train], args.bonus_lambda).to(device)
    with torch.no_grad():
        val_mse = F.mse_loss(conservative(features[val])[1], scores[val]).item()
        best = data["true_rewards" if "true_rewards" in data else "scores"].max().item()
        median = data["true_rewards" if "true_rewards" in data else "scores"].median().item()
    torch.save(conservative.state_dict(), os.path.join(run_dir, "reward_model.pt"))
    print(f"reward model: validation MSE {val_mse:.4g} on {num_val} held-out examples; offline data best {best:.4g}, "
          f"median {median:.4g} ({'true reward' if 'true_rewards' in data else 'score'})")  # fmt: skip

    def reward_fn(images, prompts=None):
        return conservative(featurize(images))[0]

    lora_params = add_lora(sd.unet, args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    eval_embeds = encode_prompts(sd, eval_prompts * 2)
    eval_latents = initial_latents(sd, len(eval_embeds), args.resolution, torch.Generator().manual_seed(args.seed), device)
    start_step = 0
    if state:
        load_lora(sd.unet, path)
        optimizer.load_state_dict(state["optimizer"])
        rng.set_state(state["rng"])
        start_step = state["step"]
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:  # drop what was logged after the checkpoint
            kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.writelines(kept)

    def evaluate(step: int) -> float:
        """Fixed-seed samples on the held-out prompts: a grid, and their mean reward."""
        with torch.no_grad():
            x0, _ = sample(sd, eval_latents, eval_embeds, negative_embeds, args.num_steps, args.guidance_scale,
                           args.eta, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
            images = decode(sd, x0)
            save_grid(images, os.path.join(run_dir, "samples", f"step_{step:06d}.png"), columns=len(eval_prompts))
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
            # ALGO LOGIC: DRaFT-style backpropagation through the last K steps (all by default) at eta = 1, keeping
            # each step's mean for the KL; the UNet calls that carry gradient and the decoder are checkpointed
            x0, trajectory = sample(sd, latents, prompt_embeds, negative_embeds, args.num_steps, args.guidance_scale,
                                    args.eta, grad_steps=args.k, checkpoint_unet=True, generator=generators,
                                    trajectory=True)  # fmt: skip
            images = decode(sd, x0, checkpoint_vae=True)
            rewards, proxy_rewards = conservative(featurize(images))  # (B,) each
            # ALGO LOGIC: the path KL to the pretrained model over the steps that carry gradient
            kl = path_kl(sd, trajectory, range(args.num_steps - args.k, args.num_steps), prompt_embeds,
                         negative_embeds, args.guidance_scale, args.eta)  # fmt: skip
            loss = (-rewards + args.kl_weight * kl).mean() / args.grad_accum_steps
            loss.backward()
            rewards_seen.append(rewards.detach())
            proxies_seen.append(proxy_rewards.detach())
            kls_seen.append(kl.detach())
            if labeler is not None:
                with torch.no_grad():
                    true_seen.append(labeler(images.detach(), batch_prompts))
            loss_total += loss.item()
        average_gradients(lora_params)  # the mean over ranks: every rank takes the same step
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
        if not (np.isfinite(loss_total) and torch.isfinite(grad_norm)):
            fail(f"the loss or its gradient became {loss_total} / {grad_norm.item()} at step {step}; stopped before the "
                 "LoRA was overwritten (the last checkpoint is intact): try a lower --learning-rate")  # fmt: skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # TRY NOT TO MODIFY: logging, samples and checkpoints (rank 0's, with the global batch's numbers)
        rewards_seen, proxies_seen, kls_seen = (gather(torch.cat(x)) for x in (rewards_seen, proxies_seen, kls_seen))
        true_seen = gather(torch.cat(true_seen)) if true_seen else None
        loss_total = gather(torch.tensor([loss_total], device=device)).mean().item()
        if rank != 0:
            continue
        if step % args.sample_every == 0 or step == args.train_steps:
            eval_reward = evaluate(step)
        metrics = {
            "step": step,
            "reward_mean": rewards_seen.mean().item(),
            "reward_std": rewards_seen.std().item() if len(rewards_seen) > 1 else 0.0,
            "proxy_reward_mean": proxies_seen.mean().item(),
            "kl": kls_seen.mean().item(),
            "true_reward_mean": true_seen.mean().item() if true_seen is not None else None,
            "offline_best": best,
            "offline_median": median,
            "reward_model_val_mse": val_mse,
            "loss": loss_total,
            "grad_norm": grad_norm.item(),
            "images_per_sec": len(rewards_seen) / (time.time() - step_start),
            "eval_reward_mean": eval_reward,
        }
        if device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if writer:
            for name, value in metrics.items():
                if name != "step" and value is not None:
                    writer.add_scalar(("losses/" if name in ("loss", "kl") else "charts/") + name, value, step)
        if step % args.save_every == 0 or step == args.train_steps:
            checkpoint_dir = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
            save_lora(sd.unet, checkpoint_dir)
            torch.save({"run_name": run_name, "step": step, "optimizer": optimizer.state_dict(), "rng": rng.get_state(),
                        "args": asdict(args)}, os.path.join(checkpoint_dir, "state.pt"))  # fmt: skip

    if rank == 0:  # loads with StableDiffusionPipeline.from_pretrained(base).load_lora_weights(run_dir)
        save_lora(sd.unet, run_dir)
        print(f"done: {run_dir}, eval reward {eval_reward}")
    if writer:
        writer.close()
    cleanup()
