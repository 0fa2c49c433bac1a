"""TRL 0.23.1's DDPOTrainer on the task of benchmarks/compare.py, with ddpo.py's flags and run folder: a reference row.

    pip install --no-deps -r benchmarks/peers/requirements-trl.txt    # TRL 0.23.1, for the benchmarks only
    python benchmarks/results/trl_ddpo_task.py --preset tiny --reward colorfulness --prompts shapes --resolution 32 \\
        --num-steps 10 --guidance-scale 5 --samples-per-epoch 16 --sample-batch-size 16 --train-batch-size 4 \\
        --num-epochs 32 --sample-every 4 --learning-rate 0.03 --seed 0 --output-dir runs/trl

TRL trains; the scripts' own run lifecycle (common/run.py's Run) evaluates and records. Each epoch is one
`trainer.step` (sampling round, per-prompt advantages, PPO's clipped importance ratio on every step of every
trajectory); around it, Run does what it does in ddpo.py, on this project's Model wrapped around TRL's modules (the
same UNet object, LoRA included): the held-out evaluation (DDIM at eta 0 from x_T = randn(seed) for 2 rows of the 4
held-out prompts of common.prompts.split_prompts, the grid, the reward of common.rewards), metrics.jsonl, TensorBoard,
checkpoints and the final LoRA. So `eval_reward_mean` and the grids mean what they mean for the six scripts, and the
run folder is theirs: {output_dir}/{reward}__{exp_name}__{seed}__{time}/metrics.jsonl, samples/epoch_XXXXXX.png
(epoch 0, every --sample-every, the last), TensorBoard events, checkpoints/, the LoRA.

The same as `ddpo.py --preset tiny --estimator is` (the defaults below are that preset's; FROM_DDPO holds the ddpo.py
defaults this file has no flag for): the model, prompts (all but the 4 held out, drawn uniformly), reward, image
size, DDIM steps, guidance (while sampling and training), eta 1, LoRA rank 4 (alpha 4, Gaussian A, B = 0) on to_q,
to_k, to_v, to_out.0, AdamW (lr, betas, eps, weight decay 1e-4), samples per epoch, batch sizes, one optimizer step
per training batch (its loss averaged over all timesteps), 1 inner epoch, every timestep trained (shuffled per
sample), clip range 1e-4, advantages clipped to +-5, per-prompt statistics over the last 16 rewards (the epoch's
below 16), gradient norm clipped to 1, fp32 on the CPU and bf16 frozen weights on CUDA, no x0 clipping.
Different: the random streams (prompts, noise and shuffles are drawn in another order: same distributions, other
draws); TRL keys its per-prompt statistics by the prompt decoded from its token ids, and needs --sample-batch-size
to be a multiple of --train-batch-size; no resuming (TRL's trainer state is not in the checkpoints that --save-every
writes); no grad_norm in the metrics.
"""

import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.shared import pipeline_model  # noqa: E402
from common.cli import cli, fail, load_or_fail  # noqa: E402
from common.flags import AtLeast1, Count, Eta, Guidance, LearningRate, Resumable, RunArgs  # noqa: E402
from common.prompts import load_prompts, sample_prompts, split_prompts  # noqa: E402
from common.rewards import make_reward  # noqa: E402
from common.run import Run  # noqa: E402

REQUIREMENTS = "benchmarks/peers/requirements-trl.txt"  # TRL 0.23.1 and what its DDPOTrainer imports


@dataclass
class Args(RunArgs):  # RunArgs (common/flags.py): the flags Run reads, with ddpo.py --preset tiny's values below
    preset: Literal["tiny"] = "tiny"
    """ddpo.py's --preset tiny, whose values are the defaults here (the only preset)"""
    exp_name: str = "trl_ddpo"
    """the name of this experiment"""
    cpu_threads: Optional[int] = 1
    """torch's threads on the CPU (ddpo.py --preset tiny's 1)"""
    save_every: Resumable[AtLeast1] = 10
    """save a checkpoint (the LoRA, for inspection: no resuming) every this many epochs"""
    sample_every: Resumable[AtLeast1] = 5
    """save a grid of fixed-seed samples on held-out prompts every this many epochs"""
    pretrained_model: str = "assets/tiny-sd"
    """a local folder or hub id of a Stable Diffusion 1.x pipeline"""
    prompts: Literal["simple_animals", "nouns_activities", "shapes"] = "shapes"
    """the prompt set"""
    num_steps: AtLeast1 = 10
    """DDIM sampling steps"""
    guidance_scale: Guidance = 5.0
    """classifier-free guidance weight"""
    eta: Eta = 1.0
    """DDIM eta (DDPO's 1: every step a Gaussian policy)"""
    resolution: int = 32
    """image height and width in pixels"""
    reward: Literal["aesthetic", "pickscore", "hpsv2", "colorfulness", "jpeg_compressibility",
                    "jpeg_incompressibility"] = "jpeg_compressibility"  # fmt: skip
    """the reward to maximise (DDPO needs no gradient of it)"""
    estimator: Literal["is"] = "is"
    """is: DDPO-IS, the only one DDPOTrainer has (PPO's clipped importance ratio)"""
    learning_rate: LearningRate = 3e-2
    """AdamW learning rate"""
    num_epochs: Count = 6
    """epochs; each is one trainer.step: a sampling round and the training on it"""
    samples_per_epoch: Count = 64
    """images sampled (with their trajectories) per epoch"""
    sample_batch_size: Count = 32
    """images per sampling batch"""
    train_batch_size: Count = 16
    """trajectories per training batch (one optimizer step each); must divide --sample-batch-size"""


# ddpo.py's defaults (its Args, not changed by its tiny preset) for what this file has no flag for
FROM_DDPO = dict(lora_rank=4, weight_decay=1e-4, grad_accum_steps=1, num_inner_epochs=1, clip_range=1e-4,
                 adv_clip_max=5.0, timestep_fraction=1.0, per_prompt_buffer=16, per_prompt_min_count=16,
                 max_grad_norm=1.0)  # fmt: skip


def trl_pipeline(name: str, resolution: int):
    """TRL's pipeline of `name`, sampling at `resolution`: its trainer passes no image size (so the UNet's default)."""
    from trl import DefaultDDPOStableDiffusionPipeline

    class Pipeline(DefaultDDPOStableDiffusionPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, height=resolution, width=resolution, **kwargs)

    return load_or_fail(Pipeline, name)


if __name__ == "__main__":
    args = cli(Args, {"tiny": {}})  # --help, one-sentence errors, each flag's allowed values checked
    if args.samples_per_epoch % args.sample_batch_size or args.sample_batch_size % args.train_batch_size:
        fail("--samples-per-epoch must be a multiple of --sample-batch-size, and that of --train-batch-size (TRL's)")
    train_prompts, eval_prompts = split_prompts(load_prompts(args.prompts))
    try:  # after cli, which quiets the libraries' warnings
        from accelerate import PartialState
        from diffusers import DDIMScheduler
        from trl import DDPOConfig, DDPOTrainer
    except ImportError:
        fail(f"TRL 0.23.1's DDPOTrainer is not installed: pip install --no-deps -r {REQUIREMENTS}")

    # TRY NOT TO MODIFY: processes and seeds, as in ddpo.py (common/run.py); quiet libraries
    run = Run(args, "DDPO (TRL 0.23.1's DDPOTrainer)", name=args.reward, counter="epoch", end=args.num_epochs)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # DDPOTrainer is deprecated in 0.23
    logging.getLogger("trl").setLevel(logging.ERROR)  # "no LoRA weights found", "no image_samples_hook"
    reward_fn = make_reward(args.reward, run.device, run.dtype)

    # ALGO LOGIC: TRL's trainer with ddpo.py's settings
    PartialState()  # TRL's pipeline logs through accelerate, which needs its state first
    pipeline = trl_pipeline(args.pretrained_model, args.resolution)
    # ddpo.py's sampler never clips x0_hat (common/models.py); TRL's scheduler takes clip_sample from the model's
    # config, which DDIM reads as True when it is missing (a PNDM config, as the tests' random model has)
    pipeline.sd_pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
    config = DDPOConfig(
        seed=args.seed,
        num_epochs=args.num_epochs,
        save_freq=10**9,  # TRL's accelerate checkpoints: never (Run writes the LoRA)
        mixed_precision="bf16" if run.dtype == torch.bfloat16 else "no",  # ddpo.py's frozen weights' dtype
        sample_num_steps=args.num_steps,
        sample_guidance_scale=args.guidance_scale,
        sample_eta=args.eta,
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
        train_cfg=True,  # guidance in the training forward pass too, as ddpo.py's
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=FROM_DDPO["per_prompt_buffer"],
        per_prompt_stat_tracking_min_count=FROM_DDPO["per_prompt_min_count"],
    )
    epoch_rewards = []  # this epoch's rewards

    def reward_function(images, batch_prompts, metadata):
        """TRL's signature: images (B, 3, H, W) in [0, 1], as from our decode."""
        with torch.no_grad():
            rewards = reward_fn(images, list(batch_prompts)).float()  # (B,)
        epoch_rewards.append(rewards.cpu())
        return rewards, {}

    def prompt_function():  # drawn from Run's generator, as ddpo.py draws its prompts
        return sample_prompts(train_prompts, 1, run.rng)[0], {}

    trainer = DDPOTrainer(config, reward_function, prompt_function, pipeline)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.unet.peft_config["default"].r == FROM_DDPO["lora_rank"]  # TRL's fixed LoRA
    # the trainer logs loss, approx_kl and clipfrac per optimizer step through accelerate; keep them
    logged = []
    trainer.accelerator.log = lambda values, step=None, log_kwargs=None: logged.append(values)

    # TRY NOT TO MODIFY: the run folder and the evaluation of ddpo.py (common/run.py), on TRL's modules
    model = pipeline_model(pipeline.sd_pipeline, args.resolution)
    start_epoch = run.start(model, trainer.optimizer, reward_fn, eval_prompts)
    pipeline.unet.eval()
    global_step = 0
    for epoch in run.steps(start_epoch):
        epoch_start, logged[:], epoch_rewards[:] = time.time(), [], []
        global_step = trainer.step(epoch - 1, global_step)  # TRL counts epochs from 0
        pipeline.unet.eval()  # TRL leaves it in train mode after a step
        rewards = torch.cat(epoch_rewards)
        steps = [values for values in logged if "loss" in values]  # one per optimizer step
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            **{k: torch.stack([s[k] for s in steps]).mean().item() for k in ("loss", "approx_kl", "clipfrac")},
            "images_per_sec": len(rewards) / (time.time() - epoch_start),
        }
        run.log(epoch, metrics)  # TRY NOT TO MODIFY: metrics, grids, checkpoints

    run.finish()  # TRY NOT TO MODIFY: the final LoRA
