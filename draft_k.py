"""DRaFT-K: Directly Fine-Tuning Diffusion Models on Differentiable Rewards, last K steps only (docs/draft.md).
Clark, Vicol, Swersky and Fleet, 2023, arXiv 2309.17400 (the DRaFT-K variant; K = 1 is their recommendation).

    python draft_k.py --k 1                     # SD 1.4, aesthetic reward, simple animals (GPU)
    python draft_k.py --k 1 --preset tiny       # the shipped tiny model: a CPU run in a minute
    python draft_k.py --k-min 1 --k 10          # random truncation: K drawn from 1..10 for each trajectory

Sample with DDIM (eta = 0) from x_T, the first T - K steps without gradient, the last K with it; decode;
maximise the differentiable reward by backpropagating through the decoder and those K denoiser calls into the LoRA.
Defaults follow the paper's small-scale setup (LoRA rank 8, AdamW lr 4e-4, weight decay 0.1, batch 4, 2k steps:
unverified against their code, which is not public); the gradient-norm clip of 1.0 is ours.
"""

import common.startup  # noqa: F401  (first: Ctrl-C while the libraries load ends in one line)

# isort: split
import time
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from common.cli import check, cli
from common.distributed import gather, sample_generators, shard
from common.flags import AtLeast0, Count, LearningRate, LoraRank, Positive, Resumable, RunArgs
from common.models import load_model
from common.prompts import load_prompts, sample_prompts, split_prompts
from common.rewards import make_reward
from common.run import Run
from common.sampling import ddim_step, step_kl


@dataclass
class Args(RunArgs):  # RunArgs (common/flags.py): the flags every script shares, then these
    reward: Union[
        Literal["aesthetic", "pickscore", "hpsv2", "hpsv2.1", "clipscore", "imagereward", "colorfulness"], str
    ] = "aesthetic"
    """the reward to maximise, differentiable (DRaFT backpropagates through it): a name, your own path.py:Name, or a
    weighted sum such as aesthetic+0.2*colorfulness"""

    # Algorithm specific arguments
    lora_rank: LoraRank = 8
    """rank of the LoRA on the denoiser's attention projections"""
    learning_rate: Resumable[LearningRate] = 4e-4
    """AdamW learning rate"""
    weight_decay: Resumable[AtLeast0] = 0.1
    """AdamW weight decay"""
    batch_size: Count = 4
    """images per micro-batch"""
    grad_accum_steps: Count = 1
    """micro-batches per optimizer step"""
    train_steps: Resumable[Count] = 2000
    """optimizer steps"""
    max_grad_norm: Resumable[Positive] = 1.0
    """clip the LoRA gradient to this norm"""
    kl_weight: AtLeast0 = 0.0
    """weight of the KL to the pretrained model on the steps that carry gradient (0: none, the paper's DRaFT)"""
    k: int = 1
    """backpropagate through the last K sampling steps only (with --k-min: the largest K drawn)"""
    k_min: Optional[int] = None
    """if set, draw K uniformly from --k-min ... --k once per trajectory (random truncation), not a fixed K"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd: coloured shapes at 32 px) on the CPU
PRESETS = {
    "sd14": {},
    "tiny": dict(
        pretrained_model="assets/tiny-sd", cpu_threads=1, reward="colorfulness", prompts="shapes", resolution=32,
        num_steps=20, guidance_scale=5.0, train_steps=60,
    ),
}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)  # --help, --preset, --resume's own flags; each flag's allowed values checked
    check(args, "k", 1 <= args.k <= args.num_steps, f"between 1 and --num-steps ({args.num_steps})")
    check(args, "k_min", args.k_min is None or 1 <= args.k_min <= args.k, f"between 1 and --k ({args.k})")
    train_prompts, eval_prompts = split_prompts(load_prompts(args.prompts, args.prompt_file), args.validation_prompts)

    # TRY NOT TO MODIFY: processes and seeds, the model and the reward (common/run.py, common/models.py)
    run = Run(args, "DRaFT-K (Clark et al., 2023)", name=args.reward, counter="step", end=args.train_steps)
    model = load_model(
        args.pretrained_model, args.revision, run.device, run.dtype, args.resolution, args.num_steps, t5=args.t5
    )
    if args.free_text_encoders:
        model.free_text_encoders(train_prompts + eval_prompts)
    if args.gradient_checkpointing:
        model.checkpoint_blocks()
    reward_fn = make_reward(args.reward, run.device, run.dtype, differentiable=True)

    # A flow model's last two steps carry no noise, so a KL penalty on them alone would be 0: it is refused.
    noiseless = model.schedule(args.num_steps).noiseless_tail()
    allowed = f"0 with --k {args.k} on this model: its last {noiseless} steps carry no noise, so there is no KL to"
    allowed += f" penalise (--k {noiseless + 1} or more would have some)"
    check(args, "kl_weight", not args.kl_weight or args.k > noiseless, allowed)

    # TRY NOT TO MODIFY: the LoRA and its optimizer; the run folder, new or --resume's (common/run.py)
    lora_params = model.add_lora(args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    start_step = run.start(model, optimizer, reward_fn, eval_prompts)

    for step in run.steps(start_step):
        step_start = time.time()
        rewards_seen, kls_seen, ks_drawn, loss_total = [], [], [], 0.0
        for _ in range(args.grad_accum_steps):
            # This process's slice of the global batch: its prompts, and one generator per sample for all its noise.
            prompts = shard(sample_prompts(train_prompts, run.world_size * args.batch_size, run.rng), args.batch_size)
            generators = sample_generators(args.batch_size, run.rng)
            cond = model.encode(prompts)
            latents = model.initial_latents(args.batch_size, generators)  # x_T, (B, C, h, w)

            # ALGO LOGIC: each trajectory's K is --k, or with --k-min one draw per trajectory (drawn for the global
            # batch, so that every process makes the same draws, and sliced like the prompts).
            k = torch.full((args.batch_size,), args.k)  # (B,)
            if args.k_min is not None:
                ks_drawn.append(torch.randint(args.k_min, args.k + 1, (len(k) * run.world_size,), generator=run.rng))
                k = shard(ks_drawn[-1], args.batch_size)

            # ALGO LOGIC: DDIM from x_T to x_0. A trajectory's first T - K steps run without gradient, so the latent
            # that enters its last K steps is a constant. Autograd is on from the earliest window in the batch; for a
            # sample whose own window has not started, the step's result is detached. The denoiser calls that carry
            # gradient, and the decoder, are checkpointed: their activations are recomputed in the backward pass.
            schedule, kl = model.schedule(args.num_steps), torch.zeros(args.batch_size, device=run.device)
            for i, t in enumerate(schedule.timesteps):
                in_window = i >= args.num_steps - k  # (B,): whether step i is one of the sample's last K
                with torch.set_grad_enabled(bool(in_window.any())):
                    output = model.predict(latents, t, cond, args.guidance_scale, checkpointed=True)
                    if args.kl_weight and torch.is_grad_enabled():  # this step's KL to the pretrained model's policy
                        pre = model.predict(latents, t, cond, args.guidance_scale, checkpointed=True, pretrained=True)
                        kl = kl + in_window.to(run.device) * step_kl(schedule, i, output, pre, latents, 1.0)
                    latents = ddim_step(schedule, i, output, latents, args.eta, generator=generators).latents
                latents = torch.where(in_window.to(run.device).view(-1, 1, 1, 1), latents, latents.detach())
            rewards = reward_fn(model.decode(latents, checkpointed=True), prompts)  # (B,)
            loss = (-rewards + args.kl_weight * kl).mean() / args.grad_accum_steps  # gradient ascent on the reward
            loss.backward()
            rewards_seen.append(rewards.detach())
            kls_seen.append(kl.detach())
            loss_total += loss.detach()

        # The optimizer step. check_gradients averages the gradients over torchrun's processes and ends the run with
        # one sentence, before the LoRA is overwritten, if the loss or a gradient is not finite.
        run.check_gradients(loss_total)
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        rewards_seen = gather(torch.cat(rewards_seen))  # the global batch's rewards, on every process
        metrics = {
            "reward_mean": rewards_seen.mean().item(),
            "reward_std": rewards_seen.std().item() if len(rewards_seen) > 1 else 0.0,
            "loss": gather(loss_total.view(1)).mean().item(),
            "kl": gather(torch.cat(kls_seen)).mean().item(),
            "grad_norm": grad_norm.item(),
            "images_per_sec": len(rewards_seen) / (time.time() - step_start),
        }
        if ks_drawn:  # random truncation: the mean K of the global batch
            metrics["k_mean"] = torch.cat(ks_drawn).float().mean().item()
        run.log(step, metrics)  # TRY NOT TO MODIFY: metrics, grids, checkpoints

    run.finish()  # TRY NOT TO MODIFY: the final LoRA
