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

import common.startup  # noqa: F401  (first: Ctrl-C while the libraries load ends in one line)

# isort: split
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.cli import check, cli
from common.distributed import gather, sample_generators, shard
from common.flags import AtLeast0, AtLeast1, Count, Eta, LearningRate, LoraRank, Positive, Resumable, RunArgs
from common.models import load_model
from common.offline_data import load_offline_data, offline_features, sample_images
from common.prompts import load_prompts, sample_prompts, split_prompts
from common.reward_models import ImageFeatures, mlp_head
from common.rewards import RewardName, make_reward
from common.run import Run
from common.sampling import ddim_step


class RewardHead(nn.Module):
    """The LAION aesthetic MLP's shape (no activations); also returns the 16 penultimate features."""

    def __init__(self, dim: int):
        super().__init__()
        head = mlp_head(dim)
        self.body, self.out = head[:-1], head[-1]  # dim-1024-128-64-16, then 16-1

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


def sample_with_kl(model, latents, cond, num_steps, guidance_scale, eta, k, generator):
    """DDIM at eta > 0 from x_T = `latents`, the last k steps with gradient (as DRaFT-K), and over those steps the
    path KL of the module docstring, mean_pre from the same denoiser with its LoRA off, on the same x_t (which carries
    the gradient of the earlier steps) and with the same guidance. A step without noise (into a flow's x_0) has no
    KL term. Returns x_0 and the KL, (B,)."""
    schedule = model.schedule(num_steps)
    noisy = (schedule.step_std(eta) > 0).tolist()
    kl = torch.zeros(len(latents), device=latents.device)
    for i, t in enumerate(schedule.timesteps):
        with torch.set_grad_enabled(i >= num_steps - k):
            output = model.predict(latents, t, cond, guidance_scale, checkpointed=True)
            step = ddim_step(schedule, i, output, latents, eta, generator=generator)
            if torch.is_grad_enabled() and noisy[i]:
                output_pre = model.predict(latents, t, cond, guidance_scale, checkpointed=True, pretrained=True)
                mean_pre = ddim_step(schedule, i, output_pre, latents, eta, prev_latents=step.latents).mean
                kl = kl + ((step.mean - mean_pre) ** 2).mean(dim=(1, 2, 3)) / (2 * step.std**2)
        latents = step.latents
    return latents, kl


@dataclass
class Args(RunArgs):  # RunArgs (common/flags.py): the flags every script shares, then these
    save_every: Resumable[AtLeast1] = 100
    """save a checkpoint (LoRA, optimizer, step, RNG) every this many optimizer steps"""
    sample_every: Resumable[AtLeast1] = 50
    """save a grid of fixed-seed samples on held-out prompts every this many optimizer steps"""
    eta: Eta = 1.0
    """DDIM eta: 1 makes every step Gaussian, so that the path KL to the pretrained model is defined"""

    # Algorithm specific arguments
    offline_data: Optional[str] = None
    """your data: an imagefolder (metadata.jsonl/.csv of file_name, prompt, reward), a Hub dataset id, a scores.csv
    folder or a .pt file (docs/braid.md); None: synthesised from the pretrained model"""
    offline_size: AtLeast1 = 1024
    """synthesised data: images sampled from the pretrained model"""
    labeler: Union[RewardName, str] = "aesthetic"
    """synthesised data: the reward that labels it (the 'true' reward, logged as true_reward_mean)"""
    label_noise: AtLeast0 = 0.1
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
    reward_model_steps: AtLeast1 = 1000
    """Adam steps fitting each reward head"""
    reward_model_lr: LearningRate = 1e-3
    """Adam learning rate of the reward heads"""
    val_fraction: float = 0.1
    """part of the offline data held out to measure the reward model's error"""
    kl_weight: AtLeast0 = 0.01
    """alpha, the weight of the path KL to the pretrained model"""
    k: Optional[int] = None
    """backpropagate through the last K steps only (None: all of them)"""
    lora_rank: LoraRank = 4
    """rank of the LoRA on the denoiser's attention projections"""
    learning_rate: Resumable[LearningRate] = 1e-3
    """AdamW learning rate"""
    weight_decay: Resumable[AtLeast0] = 0.1
    """AdamW weight decay"""
    batch_size: Count = 4
    """images per micro-batch"""
    grad_accum_steps: Count = 1
    """micro-batches per optimizer step"""
    train_steps: Resumable[Count] = 500
    """optimizer steps"""
    max_grad_norm: Resumable[Positive] = 5.0
    """clip the LoRA gradient to this norm"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd) on the CPU, its VAE's features (no CLIP download)
PRESETS = {
    "sd14": {},
    "tiny": dict(
        pretrained_model="assets/tiny-sd", cpu_threads=1, labeler="colorfulness", prompts="shapes",
        feature_model="vae", resolution=32, num_steps=20, guidance_scale=5.0, offline_size=256, offline_quantile=0.5,
        train_steps=40,
    ),
}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)  # --help, --preset, --resume's own flags; each flag's allowed values checked
    check(args, "k", args.k is None or 1 <= args.k <= args.num_steps, f"between 1 and --num-steps ({args.num_steps})")
    args.k = args.k or args.num_steps
    check(args, "eta", args.eta > 0, "above 0 for BRAID, so that every step is Gaussian and the path KL defined")
    check(args, "c", 0 <= args.c < float("inf"), "at least 0 (0: the non-conservative baseline)")
    check(args, "offline_quantile", 0 < args.offline_quantile <= 1, "in (0, 1]")
    check(args, "val_fraction", 0 < args.val_fraction < 1, "in (0, 1)")
    check(args, "bonus_lambda", 0 < args.bonus_lambda < float("inf"), "above 0 (it keeps Sigma invertible)")
    check(args, "ensemble_size", args.conservatism == "bonus" or args.ensemble_size >= 2, "at least 2 with boot")
    # ALGO LOGIC: your offline data (--offline-data), read first: where every image has a prompt, the model is
    # fine-tuned on those prompts instead of --prompts.
    data, prompts = None, load_prompts(args.prompts, args.prompt_file)
    if args.offline_data is not None:
        data = load_offline_data(args.offline_data, args.resolution)
        if isinstance(data, dict) and data.get("prompts") and all(isinstance(p, str) and p for p in data["prompts"]):
            prompts = sorted(set(data["prompts"]))
            if os.environ.get("RANK", "0") == "0":
                print(f"fine-tuning on the {len(prompts)} prompts of {args.offline_data}, not on --prompts")
    train_prompts, eval_prompts = split_prompts(prompts, args.validation_prompts)
    data_source = "offline" if args.offline_data is not None else args.labeler  # the run folder's name starts with it

    # TRY NOT TO MODIFY: processes and seeds, the model and the reward (common/run.py, common/models.py)
    run = Run(args, "BRAID (Uehara et al., 2024)", name=data_source, counter="step", end=args.train_steps)
    model = load_model(
        args.pretrained_model, args.revision, run.device, run.dtype, args.resolution, args.num_steps, t5=args.t5
    )
    if args.free_text_encoders:
        model.free_text_encoders(train_prompts + eval_prompts)
    if args.gradient_checkpointing:
        model.checkpoint_blocks()

    # ALGO LOGIC: the offline data of a resumed run, or (BRAID's protocol) images of the pretrained model scored by
    # the labeler plus label noise, of which only the scores up to --offline-quantile are kept, so that the
    # fine-tuned model has to extrapolate beyond the data. The labeler's own reward is logged as the true one.
    labeler = None if args.offline_data is not None else make_reward(args.labeler, run.device, run.dtype)
    synthesised = data is None and not run.dir
    source = args.offline_data or f"{run.dir}/offline_data.pt" if not synthesised else "the synthesised offline data"
    if data is None and run.dir:
        data = load_offline_data(source, args.resolution, "the resumed run's offline data")
    if synthesised:
        generator = torch.Generator().manual_seed(args.seed + 1)
        images, true_rewards, data_prompts = sample_images(
            model,
            labeler,
            train_prompts,
            size=args.offline_size,
            batch_size=args.batch_size,
            num_steps=args.num_steps,
            guidance_scale=args.guidance_scale,
            eta=args.eta,
            generator=generator,
        )
        scores = true_rewards + args.label_noise * torch.randn(len(true_rewards), generator=generator)
        keep = scores <= torch.quantile(scores, args.offline_quantile)
        prompts_kept = [p for p, k in zip(data_prompts, keep) if k]
        data = {
            "images": images[keep],
            "scores": scores[keep],
            "true_rewards": true_rewards[keep],
            "prompts": prompts_kept,
        }

    # ALGO LOGIC: the conservative reward model on frozen features, with a held-out split to measure its error.
    featurize = ImageFeatures(args.feature_model, model).to(run.device)
    model_rng = torch.Generator().manual_seed(args.seed + 2)  # the split, the resamples, the heads' minibatches
    features, scores, val, train = offline_features(
        data, source, featurize, args.resolution, args.val_fraction, model_rng
    )
    resamples = [train]  # the bonus's one head fits the whole training split; the bootstrap's heads, resamples of it
    if args.conservatism == "boot":
        draws = [torch.randint(len(train), (len(train),), generator=model_rng) for _ in range(args.ensemble_size)]
        resamples = [train[draw.to(run.device)] for draw in draws]
    heads = []
    for i in tqdm(resamples, desc="fitting the reward model", disable=run.rank != 0):
        heads.append(fit_head(features[i], scores[i], args.reward_model_steps, args.reward_model_lr, model_rng))
    conservative = ConservativeReward(heads, args.c, features[train], args.bonus_lambda).to(run.device)
    labels = data.get("true_rewards", data["scores"])  # the offline data's true rewards where known
    best, median = labels.max().item(), labels.median().item()
    with torch.no_grad():
        val_mse = F.mse_loss(conservative(features[val])[1], scores[val]).item()

    def reward_fn(images, prompts=None):
        return conservative(featurize(images))[0]

    true = f"the labeler's ({args.labeler}), logged as true_reward_mean" if labeler else "not known (your own data)"
    reward_name = "conservative reward r_c"
    notes = "The held-out reward is BRAID's conservative reward r_c, learned from the offline data: the proxy it"
    notes += f" maximises. The true reward is {true}."

    # TRY NOT TO MODIFY: the LoRA and its optimizer; the run folder, new or --resume's (common/run.py)
    lora_params = model.add_lora(args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    start_step = run.start(
        model, optimizer, reward_fn, eval_prompts, eval_eta=args.eta, reward_name=reward_name, card_notes=notes
    )

    if run.rank == 0:  # the synthesised data (a resumed run reads them back) and the reward model, in the run folder
        data_file, model_file = os.path.join(run.dir, "offline_data.pt"), os.path.join(run.dir, "reward_model.pt")
        if synthesised:
            run.written("the offline data", data_file, lambda: torch.save(data, data_file))
        run.written("the reward model", model_file, lambda: torch.save(conservative.state_dict(), model_file))
        print(f"reward model: validation MSE {val_mse:.4g}; offline data: best {best:.4g}, median {median:.4g}")
        print(notes)
    for step in run.steps(start_step):
        step_start = time.time()
        rewards_seen, proxies_seen, true_seen, kls_seen, loss_total = [], [], [], [], 0.0
        for _ in range(args.grad_accum_steps):
            # This process's slice of the global batch: its prompts, and one generator per sample for all its noise.
            prompts = shard(sample_prompts(train_prompts, run.world_size * args.batch_size, run.rng), args.batch_size)
            generators = sample_generators(args.batch_size, run.rng)
            cond = model.encode(prompts)
            latents = model.initial_latents(args.batch_size, generators)  # x_T, (B, C, h, w)
            # ALGO LOGIC: backpropagation through the last K steps at eta = 1, with their path KL, from the
            # conservative reward.
            x0, kl = sample_with_kl(
                model, latents, cond, args.num_steps, args.guidance_scale, args.eta, args.k, generators
            )
            images = model.decode(x0, checkpointed=True)
            rewards, proxy_rewards = conservative(featurize(images))  # (B,) each
            loss = (-rewards + args.kl_weight * kl).mean() / args.grad_accum_steps
            loss.backward()
            rewards_seen.append(rewards.detach())
            proxies_seen.append(proxy_rewards.detach())
            kls_seen.append(kl.detach())
            if labeler is not None:  # on detached images: no graph
                true_seen.append(labeler(images.detach(), prompts))
            loss_total += loss.detach()

        # The optimizer step. check_gradients averages the gradients over torchrun's processes and ends the run with
        # one sentence, before the LoRA is overwritten, if the loss or a gradient is not finite.
        run.check_gradients(loss_total)
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
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
        run.log(step, metrics)  # TRY NOT TO MODIFY: metrics, grids, checkpoints

    run.finish()  # TRY NOT TO MODIFY: the final LoRA
