"""DRaFT: Directly Fine-Tuning Diffusion Models on Differentiable Rewards, through every step (docs/draft.md).
Clark, Vicol, Swersky and Fleet, 2023, arXiv 2309.17400 (the full-backpropagation method).

    python draft_full.py                        # SD 1.4, aesthetic reward, simple animals (GPU)
    python draft_full.py --preset tiny          # the shipped tiny model: a CPU run in minutes

Sample with DDIM (eta = 0) from x_T with gradient through all T steps; decode; maximise the differentiable
reward by backpropagating through the decoder and every denoiser call into the LoRA. Every denoiser call and the
decoder are checkpointed (recomputed in the backward pass), so memory does not grow with T; time does.
Defaults follow the paper's small-scale setup (LoRA rank 8, AdamW lr 4e-4, weight decay 0.1, batch 4, 2k steps:
unverified against their code, which is not public); the gradient-norm clip of 1.0 is ours.
"""

import os
import time
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from common import check, cli
from common.distributed import gather, sample_generators, shard
from common.models import SD14, load_model
from common.prompts import load_prompts, sample_prompts, split_prompts
from common.rewards import make_reward
from common.run import Run
from common.sampling import ddim_step, step_kl


@dataclass
class Args:
    preset: Literal["sd14", "tiny"] = "sd14"
    """sd14: the paper's setting on SD 1.4 (a GPU); tiny: the shipped tiny model on the CPU (flags still apply)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """cuDNN's deterministic kernels (--no-torch-deterministic: faster, not reproducible to the bit)"""
    cuda: bool = True
    """use a CUDA device when there is one (--no-cuda: the CPU)"""
    track: bool = False
    """also log to Weights and Biases (pip install wandb)"""
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
    push_to_hub: bool = False
    """upload the final LoRA and its model card to the Hugging Face Hub (checked before training: a token is needed)"""
    hub_model_id: Optional[str] = None
    """the Hub repository to upload to, user/name (default: the run folder's name under your account)"""
    resume: Optional[str] = None
    """a checkpoint folder (runs/.../checkpoints/step_000100) or a run folder (its latest checkpoint)"""

    # Model, reward and prompts
    pretrained_model: str = SD14
    """hub id or local folder of a diffusers pipeline: SD 1.x or 2.x, SDXL, SD 3 or 3.5, FLUX.1, Qwen-Image"""
    revision: Optional[str] = None
    """the model's revision on the hub"""
    t5: bool = True
    """use the T5 text encoder of a model that has one (SD 3); --no-t5 leaves it out (~9 GB less at SD 3.5 scale)"""
    free_text_encoders: bool = False
    """encode the training and held-out prompts once, then free the text encoders' memory (docs/RUNS.md)"""
    gradient_checkpointing: bool = False
    """recompute each denoiser block in the backward pass instead of keeping its activations (docs/RUNS.md)"""
    reward: Union[Literal["aesthetic", "pickscore", "hpsv2", "colorfulness"], str] = "aesthetic"
    """the reward to maximise, differentiable (DRaFT backpropagates through it): a name, your own path.py:Name, or a
    weighted sum such as aesthetic+0.2*colorfulness"""
    prompts: Literal["simple_animals", "nouns_activities", "shapes"] = "simple_animals"
    """the prompt set"""
    prompt_file: Optional[str] = None
    """a file of prompts, one per line, instead of --prompts"""
    validation_prompts: tuple[str, ...] = ()
    """prompts or files of them for the grids and the held-out reward (default: 4 held out of --prompts)"""
    num_steps: int = 50
    """DDIM sampling steps"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight (FLUX.1-dev: its guidance input, 3.5 in its pipeline; FLUX.1-schnell: none)"""
    eta: float = 0.0
    """DDIM eta (0: deterministic sampling, as in the paper)"""
    resolution: int = 512
    """image height and width in pixels"""
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    """dtype of the frozen weights: bf16, no (fp32), or auto (bf16 on CUDA, fp32 on the CPU); the LoRA stays fp32"""

    # Algorithm specific arguments
    lora_rank: int = 8
    """rank of the LoRA on the denoiser's attention projections"""
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
    kl_weight: float = 0.0
    """weight of the KL to the pretrained model on the steps that carry gradient (0: none, the paper's DRaFT)"""


# --preset tiny: the shipped tiny text-to-image model (assets/tiny-sd: coloured shapes at 32 px) on the CPU
PRESETS = {"sd14": {}, "tiny": dict(pretrained_model="assets/tiny-sd", reward="colorfulness", prompts="shapes",
                                    resolution=32, num_steps=20, guidance_scale=5.0, train_steps=60)}  # fmt: skip


if __name__ == "__main__":
    args = cli(Args, PRESETS)  # --help, --preset, --resume's own flags; every shared value checked
    check(args, "kl_weight", 0 <= args.kl_weight < float("inf"), "at least 0")
    train_prompts, eval_prompts = split_prompts(load_prompts(args.prompts, args.prompt_file), args.validation_prompts)

    # TRY NOT TO MODIFY: processes and seeds, the model and the reward (common/run.py, common/models.py)
    run = Run(args, name=args.reward)
    model = load_model(
        args.pretrained_model, args.revision, run.device, run.dtype, args.resolution, args.num_steps, t5=args.t5
    )
    if args.free_text_encoders:
        model.free_text_encoders(train_prompts + eval_prompts)
    if args.gradient_checkpointing:
        model.checkpoint_blocks()
    reward_fn = make_reward(args.reward, run.device, run.dtype, differentiable=True)

    # TRY NOT TO MODIFY: the LoRA and its optimizer; the run folder, new or --resume's (common/run.py)
    lora_params = model.add_lora(args.lora_rank)
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.weight_decay)
    start_step = run.start(model, optimizer, reward_fn, eval_prompts)

    for step in run.steps(start_step, args.train_steps):
        step_start = time.time()
        rewards_seen, kls_seen, loss_total = [], [], 0.0
        for _ in range(args.grad_accum_steps):
            # this rank's slice of the global batch: its prompts, and one generator per sample for all its noise
            prompts = shard(sample_prompts(train_prompts, run.world_size * args.batch_size, run.rng), args.batch_size)
            generators = sample_generators(args.batch_size, run.rng)
            cond = model.encode(prompts)
            latents = model.initial_latents(args.batch_size, generators)  # x_T, (B, C, h, w)
            # ALGO LOGIC: DDIM from x_T to x_0, every step with gradient. The denoiser calls and the decoder are
            # checkpointed (their activations are recomputed in the backward pass instead of stored), so memory does
            # not grow with T
            schedule, kl = model.schedule(args.num_steps), torch.zeros(args.batch_size, device=run.device)
            for i, t in enumerate(schedule.timesteps):
                with torch.set_grad_enabled(True):
                    output = model.predict(latents, t, cond, args.guidance_scale, checkpointed=True)
                    if args.kl_weight and torch.is_grad_enabled():  # this step's KL to the pretrained model's policy
                        pre = model.predict(latents, t, cond, args.guidance_scale, checkpointed=True, pretrained=True)
                        kl = kl + step_kl(schedule, i, output, pre, latents, 1.0)
                    latents = ddim_step(schedule, i, output, latents, args.eta, generator=generators).latents
            rewards = reward_fn(model.decode(latents, checkpointed=True), prompts)  # (B,)
            loss = (-rewards + args.kl_weight * kl).mean() / args.grad_accum_steps  # gradient ascent on the reward
            loss.backward()
            rewards_seen.append(rewards.detach())
            kls_seen.append(kl.detach())
            loss_total += loss.detach()
        grad_norm = run.optimizer_step(loss_total)
        rewards_seen = gather(torch.cat(rewards_seen))  # the global batch's, on every rank
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
