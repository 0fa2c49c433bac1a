"""TRL 0.23.1's DDPOTrainer on the task of benchmarks/compare.py, with ddpo.py's flags and run folder: a reference row.

    pip install --no-deps -r benchmarks/requirements-peers.txt      # TRL 0.23.1, for the benchmarks only
    python benchmarks/trl_ddpo_task.py --preset tiny --reward colorfulness --prompts shapes --resolution 32 \\
        --num-steps 10 --guidance-scale 5 --samples-per-epoch 16 --sample-batch-size 16 --train-batch-size 4 \\
        --num-epochs 32 --sample-every 4 --learning-rate 0.03 --seed 0 --output-dir runs/trl

TRL trains; this file evaluates. Each epoch is one `trainer.step` (sampling round, per-prompt advantages, PPO's
clipped importance ratio on every step of every trajectory); between epochs our evaluation runs on TRL's UNet (LoRA
included), exactly as ddpo.py's: DDIM at eta 0 from x_T = randn(seed) for 2 rows of the 4 held-out prompts, the grid
saved by common.sampling.save_grid, the reward by common.rewards. So `eval_reward_mean` and the grids mean what they
mean for the six scripts. The run folder is theirs: {output_dir}/{reward}__{exp_name}__{seed}__{time}/metrics.jsonl,
samples/epoch_XXXXXX.png (epoch 0, every --sample-every, the last), TensorBoard events, the LoRA.

The same as `ddpo.py --preset tiny --estimator is` (the defaults below are that preset's; FROM_DDPO holds the ddpo.py
defaults this file has no flag for): the model, prompts (all but the 4 held out, drawn uniformly), reward, image
size, DDIM steps, guidance (while sampling and training), eta 1, LoRA rank 4 (alpha 4, Gaussian A, B = 0) on to_q,
to_k, to_v, to_out.0, AdamW (lr, betas, eps, weight decay 1e-4), samples per epoch, batch sizes, one optimizer step
per training batch (its loss averaged over all timesteps), 1 inner epoch, every timestep trained (shuffled per
sample), clip range 1e-4, advantages clipped to +-5, per-prompt statistics over the last 16 rewards (the epoch's
below 16), gradient norm clipped to 1, fp32 on the CPU and bf16 frozen weights on CUDA, no x0 clipping.
Different: the random streams (prompts, noise and shuffles are drawn in another order: same distributions, other
draws); TRL keys its per-prompt statistics by the prompt decoded from its token ids, and needs --sample-batch-size
to be a multiple of --train-batch-size; no resuming (--save-every writes the LoRA only); no grad_norm in the metrics.
"""

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from accelerate import PartialState
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import check_args, fail, load_or_fail  # noqa: E402
from common.checkpoint import open_run_dir  # noqa: E402
from common.prompts import load_prompts, sample_prompts  # noqa: E402
from common.rewards import REWARDS, make_reward  # noqa: E402
from common.sampling import decode, initial_latents, sample, save_grid  # noqa: E402
from common.sd import StableDiffusion, encode_prompts, save_lora  # noqa: E402

try:
    from diffusers import DDIMScheduler
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
except ImportError:
    fail("TRL 0.23.1's DDPOTrainer is not installed: pip install --no-deps -r benchmarks/requirements-peers.txt")


@dataclass
class Args:
    preset: Literal["tiny"] = "tiny"
    """ddpo.py's --preset tiny, whose values are the defaults here (the only preset)"""
    exp_name: str = "trl_ddpo"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (TRL's set_seed, the prompt draws, the evaluation's x_T)"""
    output_dir: str = "runs"
    """the run folder is {output_dir}/{run_name}"""
    save_every: int = 10
    """write the LoRA to checkpoints/epoch_XXXXXX every this many epochs (no resuming)"""
    sample_every: int = 5
    """save a grid of fixed-seed samples on held-out prompts every this many epochs"""
    pretrained_model: str = "assets/tiny-sd"
    """a local folder or hub id of a Stable Diffusion 1.x pipeline"""
    reward: str = "jpeg_compressibility"
    """the reward to maximise (any of common/rewards.py; DDPO needs no gradient of it)"""
    prompts: str = "shapes"
    """the prompt set (simple_animals, nouns_activities, shapes)"""
    num_steps: int = 10
    """DDIM sampling steps"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight"""
    resolution: int = 32
    """image height and width in pixels"""
    estimator: Literal["is"] = "is"
    """is: DDPO-IS, the only one DDPOTrainer has (PPO's clipped importance ratio)"""
    learning_rate: float = 3e-2
    """AdamW learning rate"""
    num_epochs: int = 6
    """epochs; each is one trainer.step: a sampling round and the training on it"""
    samples_per_epoch: int = 64
    """images sampled (with their trajectories) per epoch"""
    sample_batch_size: int = 32
    """images per sampling batch"""
    train_batch_size: int = 16
    """trajectories per training batch (one optimizer step each); must divide --sample-batch-size"""


# ddpo.py's defaults (its Args, not changed by its tiny preset) for what this file has no flag for
FROM_DDPO = dict(eta=1.0, lora_rank=4, weight_decay=1e-4, grad_accum_steps=1, num_inner_epochs=1, clip_range=1e-4,
                 adv_clip_max=5.0, timestep_fraction=1.0, per_prompt_buffer=16, per_prompt_min_count=16,
                 max_grad_norm=1.0)  # fmt: skip


class Pipeline(DefaultDDPOStableDiffusionPipeline):
    """TRL's pipeline, sampling at --resolution: its trainer passes no image size (so the UNet's default)."""

    resolution: int

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, height=self.resolution, width=self.resolution, **kwargs)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if args.samples_per_epoch % args.sample_batch_size or args.sample_batch_size % args.train_batch_size:
        fail("--samples-per-epoch must be a multiple of --sample-batch-size, and that of --train-batch-size (TRL's)")
    if args.reward not in REWARDS:
        fail(f"unknown reward '{args.reward}'; choose one of: {', '.join(REWARDS)}")
    prompts = load_prompts(args.prompts)
    run_name = f"{args.reward}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # TRY NOT TO MODIFY: run folder, tracking, quiet libraries
    run_dir = open_run_dir(args.output_dir, run_name, None, None, rank=0)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{k}|{v}|" for k, v in {**vars(args), **FROM_DDPO}.items()))  # fmt: skip
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # DDPOTrainer is deprecated in 0.23
    logging.getLogger("trl").setLevel(logging.ERROR)  # "no LoRA weights found", "no image_samples_hook"
    cuda = torch.cuda.is_available()  # TRL's accelerator takes the GPU if there is one
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32  # as ddpo.py
    # 4 prompts spread through the set are held out of training and used for the sample grids (as in ddpo.py)
    held_out = [round((i + 0.5) * len(prompts) / 4) for i in range(4)] if len(prompts) > 4 else []
    eval_prompts = [prompts[i] for i in held_out] or prompts[:4]
    train_prompts = [p for i, p in enumerate(prompts) if i not in held_out]

    # ALGO LOGIC: TRL's trainer with ddpo.py's settings
    PartialState()  # TRL's pipeline logs through accelerate, which needs its state first
    pipeline = load_or_fail(Pipeline, args.pretrained_model)
    pipeline.resolution = args.resolution
    # ddpo.py's scheduler (common.sd.load_sd) never clips x0_hat; TRL's takes clip_sample from the model's config,
    # which DDIM reads as True when it is missing (a PNDM config, as the tests' random model has)
    pipeline.sd_pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
    config = DDPOConfig(
        seed=args.seed,
        num_epochs=args.num_epochs,
        save_freq=10**9,  # TRL's accelerate checkpoints: never (the LoRA is written below)
        mixed_precision="bf16" if cuda else "no",
        sample_num_steps=args.num_steps,
        sample_guidance_scale=args.guidance_scale,
        sample_eta=FROM_DDPO["eta"],
        sample_batch_size=args.sample_batch_size,
        sample_num_batches_per_epoch=args.samples_per_epoch // args.sample_batch_size,
        train_batch_size=args.train_batch_size,
        train_learning_rate=args.learning_rate,
        train_adam_weight_decay=FROM_DDPO["weight_decay"],
        train_gradient_accumulation_steps=FROM_DDPO["grad_accum_steps"],
        train_num_inner_epochs=FROM_DDPO["num_inner_epochs"],
        train_clip_range=FROM_DDPO["clip_range"],
        train_adv_clip_max=FROM_DDPO["adv_clip_max"],
        train_timestep_fraction=FROM_DDPO["timestep_fraction"],
        train_max_grad_norm=FROM_DDPO["max_grad_norm"],
        train_cfg=True,  # guidance in the training forward pass too, as ddpo.py's predict_noise
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=FROM_DDPO["per_prompt_buffer"],
        per_prompt_stat_tracking_min_count=FROM_DDPO["per_prompt_min_count"],
    )
    reward_fn = make_reward(args.reward, device, dtype)
    prompt_rng, epoch_rewards = torch.Generator().manual_seed(args.seed), []  # the prompt draws; this epoch's rewards

    def reward_function(images, batch_prompts, metadata):
        """TRL's signature: images (B, 3, H, W) in [0, 1], as from our decode."""
        with torch.no_grad():
            rewards = reward_fn(images, list(batch_prompts)).float()  # (B,)
        epoch_rewards.append(rewards.cpu())
        return rewards, {}

    def prompt_function():
        return sample_prompts(train_prompts, 1, prompt_rng)[0], {}

    trainer = DDPOTrainer(config, reward_function, prompt_function, pipeline)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.unet.peft_config["default"].r == FROM_DDPO["lora_rank"]  # TRL's fixed LoRA
    # the trainer logs loss, approx_kl and clipfrac per optimizer step through accelerate; keep them
    logged = []
    trainer.accelerator.log = lambda values, step=None, log_kwargs=None: logged.append(values)

    # our evaluation (ddpo.py's), on TRL's modules: the same UNet object, LoRA included
    sd = StableDiffusion(pipeline.tokenizer, pipeline.text_encoder, pipeline.unet, pipeline.vae,
                         DDIMScheduler.from_config(pipeline.scheduler.config))  # fmt: skip
    negative_embeds = encode_prompts(sd, [""])  # (1, 77, D)
    eval_embeds = encode_prompts(sd, eval_prompts * 2)
    eval_latents = initial_latents(
        sd, len(eval_embeds), args.resolution, torch.Generator().manual_seed(args.seed), device
    )

    def evaluate(epoch: int) -> float:
        """Fixed-seed samples on the held-out prompts: a grid (on disk and in TensorBoard), and their mean reward."""
        pipeline.unet.eval()  # TRL leaves it in train mode after a step
        x0, _ = sample(sd, eval_latents, eval_embeds, negative_embeds, args.num_steps, args.guidance_scale)
        with torch.no_grad():
            images = decode(sd, x0)
            grid = save_grid(
                images, os.path.join(run_dir, "samples", f"epoch_{epoch:06d}.png"), columns=len(eval_prompts)
            )
            writer.add_image("samples", grid, epoch, dataformats="HWC")
            return reward_fn(images, eval_prompts * 2).mean().item()

    eval_reward, global_step = evaluate(0), 0
    for epoch in tqdm(range(1, args.num_epochs + 1)):
        epoch_start, logged[:], epoch_rewards[:] = time.time(), [], []
        global_step = trainer.step(epoch - 1, global_step)  # TRL counts epochs from 0
        rewards = torch.cat(epoch_rewards)
        steps = [values for values in logged if "loss" in values]  # one per optimizer step
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            **{k: torch.stack([s[k] for s in steps]).mean().item() for k in ("loss", "approx_kl", "clipfrac")},
            "images_per_sec": len(rewards) / (time.time() - epoch_start),
        }

        # TRY NOT TO MODIFY: logging, samples and LoRA checkpoints
        if epoch % args.sample_every == 0 or epoch == args.num_epochs:
            eval_reward = evaluate(epoch)
        metrics = {"epoch": epoch, **metrics, "eval_reward_mean": eval_reward}
        if cuda:
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for name, value in metrics.items():
            if name != "epoch":
                writer.add_scalar(("losses/" if "loss" in name or "kl" in name else "charts/") + name, value, epoch)
        if epoch % args.save_every == 0 or epoch == args.num_epochs:
            save_lora(pipeline.unet, os.path.join(run_dir, "checkpoints", f"epoch_{epoch:06d}"))

    save_lora(pipeline.unet, run_dir)
    writer.close()
    print(f"done: {run_dir}, eval reward {eval_reward}")
