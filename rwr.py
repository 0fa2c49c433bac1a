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

import common.startup  # noqa: F401  (first: Ctrl-C while the libraries load ends in one line)

# isort: split
import time
from dataclasses import dataclass
from typing import Union

import torch

from common.cli import check, cli, fail
from common.distributed import gather, sample_generators, shard, shuffle
from common.flags import AtLeast0, AtLeast1, Count, Guidance, LearningRate, LoraRank, Positive, Resumable, RunArgs
from common.lora import EMA
from common.models import Conditioning, load_model
from common.prompts import load_prompts, sample_prompts, split_prompts
from common.rewards import RewardName, Scorer, make_reward
from common.run import Run
from common.sampling import randn, sample


def rwr_weights(rewards, beta: float, sparse: bool, percentile: float, sample_batch_size: int) -> torch.Tensor:
    """RWR: N softmax(beta r) over the whole round, so the weights average 1. Sparse RWR: 1 where r is at or above
    the `percentile` of its sampling batch (the round's rewards come in batches of `sample_batch_size`), else 0."""
    if not sparse:
        return len(rewards) * torch.softmax(beta * rewards, dim=0)
    batches = rewards.view(-1, sample_batch_size)  # (num_batches, B)
    thresholds = torch.quantile(batches, percentile / 100, dim=1, keepdim=True)
    return (batches >= thresholds).float().flatten()


def denoising_loss(model, latents, cond, index, noise, weights, kl_weight=0.0, guidance_scale=1.0) -> torch.Tensor:
    """mean_i w_i || target_i - model(z_t, t_i, c_i) ||^2 (mean over latent dims), z_t = alpha_t z_0 + sigma_t eps at
    the training timesteps `index` (B,): the model's ordinary training loss, on the conditional model (no guidance;
    a guidance-distilled model at its guidance input, model.training_guidance), with the target it was trained on:
    eps (SD), v = alpha eps - sigma z_0 (SD 2.x at 768 px), or the velocity eps - z_0 (a flow). `kl_weight`: adds
    the squared distance to the pretrained model's prediction (docs/rwr.md)."""
    path, guidance = model.training_schedule(), model.training_guidance(guidance_scale)
    alpha, sigma = path.alphas[index].view(-1, 1, 1, 1), path.sigmas[index].view(-1, 1, 1, 1)
    noisy_latents = alpha * latents + sigma * noise
    target = {"epsilon": noise, "v_prediction": alpha * noise - sigma * latents, "flow": noise - latents}
    output = model.predict(noisy_latents, path.timesteps[index], cond, guidance)
    loss = (weights * ((output - target[path.prediction_type]) ** 2).mean(dim=(1, 2, 3))).mean()
    if kl_weight:  # the pull towards the pretrained model: the KL between the two models' reverse steps at (z_t, t)
        pretrained = model.predict(noisy_latents, path.timesteps[index], cond, guidance, pretrained=True)
        loss = loss + kl_weight * ((output - pretrained) ** 2).mean()  # up to a per-timestep factor, left out as above
    return loss


@dataclass
class Args(RunArgs):  # RunArgs (common/flags.py): the flags every script shares, then these
    save_every: Resumable[AtLeast1] = 10
    """save a checkpoint (LoRA, optimizer, epoch, RNG) every this many epochs"""
    sample_every: Resumable[AtLeast1] = 5
    """save a grid of fixed-seed samples on held-out prompts every this many epochs"""
    guidance_scale: Guidance = 5.0
    """classifier-free guidance weight (FLUX.1-dev: its guidance input, 3.5 in its pipeline; FLUX.1-schnell: none)"""
    reward: Union[RewardName, str] = "aesthetic"
    """the reward to maximise (RWR needs no gradient of it): a name, your own path.py:Name, or a weighted sum such
    as aesthetic+0.2*colorfulness"""

    # Algorithm specific arguments
    sparse: bool = False
    """sparse RWR: weight 1 for the samples at or above --percentile of their sampling batch, 0 for the rest"""
    beta: float = 0.2
    """inverse temperature of the weights N softmax(beta r), in the reward's inverse units (0: uniform weights)"""
    percentile: float = 90.0
    """sparse RWR's percentile"""
    lora_rank: LoraRank = 4
    """rank of the LoRA on the denoiser's attention projections"""
    learning_rate: Resumable[LearningRate] = 3e-4
    """AdamW learning rate"""
    weight_decay: Resumable[AtLeast0] = 1e-4
    """AdamW weight decay"""
    num_epochs: Resumable[Count] = 100
    """epochs; each is one sampling round and the training on it"""
    samples_per_epoch: Count = 256
    """images sampled per epoch"""
    sample_batch_size: Count = 8
    """images per sampling batch (sparse RWR's percentile is taken within it)"""
    train_batch_size: Count = 4
    """generated latents per training batch"""
    grad_accum_steps: Count = 1
    """training batches per optimizer step"""
    num_inner_epochs: Count = 1
    """passes over each epoch's samples"""
    max_grad_norm: Resumable[Positive] = 1.0
    """clip the LoRA gradient to this norm"""
    kl_weight: AtLeast0 = 0.0
    """weight of the squared distance to the pretrained model's prediction in the loss (0: none, RWR as published)"""
    ema_decay: float = 0.0
    """> 0: evaluate with an exponential moving average of the LoRA at this decay, saved in ema/ beside it"""
    async_reward: bool = True
    """score each sampling batch in a worker thread while the next one samples (--no-async-reward: in turn; the
    rewards are the same)"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd: coloured shapes at 32 px) on the CPU, with the
# settings of the learning test (tests/test_ddpo_rwr.py); beta 30 because the reward is in kB with a spread of ~0.07
PRESETS = {
    "sd14": {},
    "tiny": dict(
        pretrained_model="assets/tiny-sd", cpu_threads=1, reward="jpeg_incompressibility", prompts="shapes",
        resolution=32, num_steps=10, guidance_scale=1.0, num_epochs=6, samples_per_epoch=64, sample_batch_size=32,
        train_batch_size=32, num_inner_epochs=2, learning_rate=3e-3, beta=30.0,
    ),
}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)  # --help, --preset, --resume's own flags; each flag's allowed values checked
    check(args, "percentile", 0 <= args.percentile <= 100, "between 0 and 100")
    check(args, "beta", 0 <= args.beta < float("inf"), "at least 0 (0: uniform weights)")
    check(args, "ema_decay", 0 <= args.ema_decay < 1, "in [0, 1)")
    if args.samples_per_epoch % args.sample_batch_size or args.samples_per_epoch % args.train_batch_size:
        fail("--samples-per-epoch must be a multiple of --sample-batch-size and of --train-batch-size")
    train_prompts, eval_prompts = split_prompts(load_prompts(args.prompts, args.prompt_file), args.validation_prompts)

    # TRY NOT TO MODIFY: processes and seeds, the model and the reward (common/run.py, common/models.py)
    run = Run(args, "RWR (reward-weighted regression)", name=args.reward, counter="epoch", end=args.num_epochs)
    model = load_model(
        args.pretrained_model, args.revision, run.device, run.dtype, args.resolution, args.num_steps, t5=args.t5
    )
    if args.free_text_encoders:
        model.free_text_encoders(train_prompts + eval_prompts)
    if args.gradient_checkpointing:
        model.checkpoint_blocks()
    reward_fn = make_reward(args.reward, run.device, run.dtype)

    scorer = Scorer(reward_fn, background=args.async_reward)  # each batch scored while the next one samples

    # TRY NOT TO MODIFY: the LoRA and its optimizer; the run folder, new or --resume's (common/run.py)
    lora_params = model.add_lora(args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    ema = EMA(lora_params, args.ema_decay) if args.ema_decay else None  # common/lora.py
    start_epoch = run.start(model, optimizer, reward_fn, eval_prompts, ema=ema)

    for epoch in run.steps(start_epoch):
        epoch_start = time.time()
        # ALGO LOGIC: a sampling round with the current model, of which only x_0's latents are kept.
        batches, conds, generators = [], [], []
        for _ in range(args.samples_per_epoch // args.sample_batch_size):
            # This process's slice of the global batch: its prompts, and one generator per sample for all its noise.
            drawn = sample_prompts(train_prompts, run.world_size * args.sample_batch_size, run.rng)
            prompts = shard(drawn, args.sample_batch_size)
            batch_generators = sample_generators(args.sample_batch_size, run.rng)
            cond = model.encode(prompts)
            latents = model.initial_latents(args.sample_batch_size, batch_generators)  # x_T
            x0, _ = sample(model, latents, cond, args.num_steps, args.guidance_scale, args.eta, batch_generators)
            batch = {
                "latents": x0,  # (B, C, h, w): the generated z_0, the regression's data
                "rewards": scorer.submit(model.decode(x0), prompts),  # (B,), once the worker has scored them
            }
            batches.append(batch)
            conds.append(cond)
            generators += batch_generators  # the training noise also comes from each sample's generator
        for batch in batches:  # the round's rewards, each batch's scored while the next one sampled
            batch["rewards"] = batch["rewards"].result()
        samples = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}  # N = samples_per_epoch
        samples["cond"] = Conditioning.cat(conds)

        # ALGO LOGIC: per-sample weights from the rewards of the whole round, of all processes.
        rewards = gather(samples["rewards"])  # (world_size * N,)
        weights = rwr_weights(rewards, args.beta, args.sparse, args.percentile, args.sample_batch_size)
        local_weights = shard(weights, args.samples_per_epoch)

        # ALGO LOGIC: the weighted denoising regression on the generated latents.
        num_batches = args.samples_per_epoch // args.train_batch_size
        num_timesteps = len(model.training_schedule())
        losses, grad_norms = [], []
        for inner_epoch in range(args.num_inner_epochs):
            order = shuffle(args.samples_per_epoch, run.rng)  # (N,), a permutation of this process's samples
            for b in range(num_batches):
                index = order[b * args.train_batch_size : (b + 1) * args.train_batch_size]
                sample_rngs = [generators[i] for i in index]  # t and eps from each sample's generator
                timesteps = torch.cat([torch.randint(num_timesteps, (1,), generator=g) for g in sample_rngs])
                latents, timesteps = samples["latents"][index], timesteps.to(run.device)
                noise = randn(latents.shape, sample_rngs, run.device)
                loss = denoising_loss(
                    model,
                    latents,
                    samples["cond"][index],
                    timesteps,
                    noise,
                    local_weights[index],
                    args.kl_weight,
                    args.guidance_scale,
                )
                (loss / args.grad_accum_steps).backward()
                losses.append(loss.detach())  # kept on the device and read once an epoch
                if (b + 1) % args.grad_accum_steps == 0 or b == num_batches - 1:
                    # The optimizer step. check_gradients averages the gradients over torchrun's processes and ends
                    # the run with one sentence, before the LoRA is overwritten, if a loss or gradient is not finite.
                    run.check_gradients(losses[-1])
                    grad_norms.append(torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema:
                        ema.update()
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "loss": gather(torch.stack(losses)).mean().item(),
            "effective_sample_size": (weights.sum() ** 2 / (weights**2).sum()).item(),
            "grad_norm": torch.stack(grad_norms).mean().item(),
            "images_per_sec": len(rewards) / (time.time() - epoch_start),
        }
        run.log(epoch, metrics)  # TRY NOT TO MODIFY: metrics, grids, checkpoints

    run.finish()  # TRY NOT TO MODIFY: the final LoRA
