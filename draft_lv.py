"""DRaFT-LV: Directly Fine-Tuning Diffusion Models on Differentiable Rewards, low-variance K = 1 (docs/draft.md).
Clark, Vicol, Swersky and Fleet, 2023, arXiv 2309.17400 (the DRaFT-LV variant).

    python draft_lv.py --n 2                    # SD 1.4, aesthetic reward, simple animals (GPU)
    python draft_lv.py --n 2 --preset tiny      # the shipped tiny model: a CPU run in minutes

Sample x_0 with DDIM (eta = 0) without gradient; then n times: re-noise the detached x_0 to x_{t_1} with fresh
noise on the model's path, take the last DDIM step again with gradient, decode and score; maximise the sum of the
n rewards. The n last steps share one sampling chain, so a step costs far less than n DRaFT-1 steps (the paper:
~10% more than one; measured at n = 2 on tiny-sd on the CPU: 1.31x one, docs/BENCHMARKS.md).
Defaults follow the paper's small-scale setup (LoRA rank 8, AdamW lr 4e-4, weight decay 0.1, batch 4, 2k steps:
unverified against their code, which is not public); the gradient-norm clip of 1.0 is ours.
"""

import common.startup  # noqa: F401  (first: Ctrl-C while the libraries load ends in one line)

# isort: split
import time
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import torch

from common.cli import check, cli
from common.distributed import gather, sample_generators, shard
from common.flags import Allowed, AtLeast0, Count, LearningRate, LoraRank, Positive, Resumable, RunArgs
from common.models import load_model
from common.prompts import load_prompts, sample_prompts, split_prompts
from common.rewards import make_reward
from common.run import Run
from common.sampling import ddim_step, randn, sample, step_kl


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
    n: Annotated[int, Allowed(lambda x: 1 <= x <= 1000, "between 1 and 1000")] = 2
    """re-noised copies of x_0 whose last step carries gradient"""


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
    train_prompts, eval_prompts = split_prompts(load_prompts(args.prompts, args.prompt_file), args.validation_prompts)

    # TRY NOT TO MODIFY: processes and seeds, the model and the reward (common/run.py, common/models.py)
    run = Run(args, "DRaFT-LV (Clark et al., 2023)", name=args.reward, counter="step", end=args.train_steps)
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
    allowed = "0 on this model: the last step, DRaFT-LV's only one with gradient, carries no noise here, so there is"
    allowed += " no KL to penalise"
    check(args, "kl_weight", not args.kl_weight or noiseless == 0, allowed)

    # TRY NOT TO MODIFY: the LoRA and its optimizer; the run folder, new or --resume's (common/run.py)
    lora_params = model.add_lora(args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    start_step = run.start(model, optimizer, reward_fn, eval_prompts)

    for step in run.steps(start_step):
        step_start = time.time()
        rewards_seen, kls_seen, loss_total = [], [], 0.0
        for _ in range(args.grad_accum_steps):
            # This process's slice of the global batch: its prompts, and one generator per sample for all its noise.
            prompts = shard(sample_prompts(train_prompts, run.world_size * args.batch_size, run.rng), args.batch_size)
            generators = sample_generators(args.batch_size, run.rng)
            cond = model.encode(prompts)
            latents = model.initial_latents(args.batch_size, generators)  # x_T, (B, C, h, w)

            # ALGO LOGIC: x_0 from the whole chain without gradient, then n copies of it re-noised to the last step's
            # noise level, x_1^i = alpha_1 x_0 + sigma_1 eps_i, each taken back to x_0^i by the last DDIM step.
            x0, _ = sample(model, latents, cond, args.num_steps, args.guidance_scale, args.eta, generator=generators)
            schedule, kl = model.schedule(args.num_steps), torch.zeros(args.batch_size, device=run.device)
            last, rewards = args.num_steps - 1, []
            for _ in range(args.n):
                noise = randn(x0.shape, generators, run.device)  # a distinct eps_i for each copy
                x1 = schedule.alphas[last] * x0.detach() + schedule.sigmas[last] * noise
                output = model.predict(x1, schedule.timesteps[last], cond, args.guidance_scale, checkpointed=True)
                if args.kl_weight:  # this step's KL to the pretrained model's policy
                    pre = model.predict(x1, schedule.timesteps[last], cond, args.guidance_scale, pretrained=True)
                    kl = kl + step_kl(schedule, last, output, pre, x1, 1.0)
                x0_i = ddim_step(schedule, last, output, x1, args.eta, generator=generators).latents
                rewards.append(reward_fn(model.decode(x0_i, checkpointed=True), prompts))  # (B,)
            rewards = torch.stack(rewards)  # (n, B)
            loss = (-rewards.sum(0) + args.kl_weight * kl).mean() / args.grad_accum_steps  # -sum_i r(x_0^i), ...
            loss.backward()
            rewards_seen.append(rewards.detach().flatten())
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
        run.log(step, metrics)  # TRY NOT TO MODIFY: metrics, grids, checkpoints

    run.finish()  # TRY NOT TO MODIFY: the final LoRA
