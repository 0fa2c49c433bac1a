"""This project's DDPO and DRaFT-1 against TRL 0.23.1's DDPOTrainer and AlignPropTrainer: the same work, side by side.

    pip install --no-deps -r benchmarks/peers/requirements-trl.txt    # TRL 0.23.1, for the benchmarks only
    python benchmarks/peers/trl_trainers.py                            # CPU: tiny-sd at 32 px, one thread per run
    python benchmarks/peers/trl_trainers.py --sd14 --threads 0         # GPU: SD 1.4's shapes at 512 px, random weights

Pairs: `ddpo.py` (DDPO-IS) against DDPOTrainer, and `draft_k.py --k 1` against AlignPropTrainer with its truncation
fixed at the last step (truncated_backprop_rand off, truncated_backprop_timestep = steps - 1), DRaFT-1 in both. Both
sides get the same model, image size (TRL samples at the UNet's default size, and our scripts are given it), DDIM
steps, guidance, eta, LoRA (rank 4 on to_q, to_k, to_v, to_out.0: TRL's fixed choice), batches, AdamW settings,
precision, prompts and reward: colourfulness (common/rewards.py), given to TRL as a callable, since TRL's aesthetic
scorer needs torchvision and breaks on transformers 5. --sd14 builds SD-1.4-shaped random models (once, in
--models-dir; benchmarks/shared.py's build_models, as speed/sd14_scale.py's).

The same work, checked: every run reports what its side holds and computes, and the first runs of a pair must agree
on all of it, or the benchmark stops and prints the table. Settings: our script's parsed Args and TRL's config, each
optimizer's param_groups, the LoRA's trainable parameter count, the UNet's dtype. Work, from a hook on the UNet
during the first iteration: UNet evaluations and their rows, latent and text-embedding shapes, timesteps (the same
input evaluated again, gradient checkpointing's recomputation, is counted apart and not compared). And the reward of
the untrained model on a fixed batch, which both sides compute from their own copy of the model.

Timing: each run is a fresh process of one side (`--child`) with --threads threads, the sides alternating (ours first
in even repeats, TRL first in odd ones) so that changes in machine load hit both. An iteration is one pass of the
training loop (DDPO: an epoch of sampling and training; DRaFT: an optimizer step); the first (warm-up) and the last
(our scripts draw their final sample grid in it) are not timed, and neither is loading. A run's images/s: the images
of its timed iterations over their wall time. Its peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU
the peak resident set of the process, and the rise of the resident set (sampled every 10 ms) above its value at the
start of the first iteration. Reported: the median and range (min-max) over repeats of each side, and of ours / TRL
over the pairs of runs of a repeat; on the CPU also ours / TRL in images per second of the process's CPU time, which
other jobs on a shared machine disturb less than the wall time.

Learning: each side's UNet samples the same fixed batch before the first iteration and after the last (our scripts'
evaluation: DDIM at eta 0 from fixed noise on 2 seeds of 4 held-out prompts) and the mean reward of each is reported.
Every run's numbers, the same-work tables and the summary go to --out (docs/results/trl_trainers.json).
"""

import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.shared import Meter, build_models, median_range, pipeline_model, run_script  # noqa: E402
from common.cli import fail  # noqa: E402
from common.prompts import load_prompts, split_prompts  # noqa: E402

PAIRS = {"ddpo": ("ddpo.py", "DDPOTrainer"), "draft1": ("draft_k.py", "AlignPropTrainer")}
WEIGHT_DECAY = {"ddpo": 1e-4, "draft1": 0.1}  # each script's default, given to TRL too
LORA_RANK = 4  # TRL's DefaultDDPOStableDiffusionPipeline always adds rank 4, alpha 4
REQUIREMENTS = "benchmarks/peers/requirements-trl.txt"  # TRL 0.23.1 and what its two trainers import


@dataclass
class Args:
    pairs: list[str] = field(default_factory=lambda: ["ddpo", "draft1"])
    """which comparisons to run: ddpo (ddpo.py vs DDPOTrainer), draft1 (draft_k.py --k 1 vs AlignPropTrainer)"""
    model: str = "assets/tiny-sd"
    """a Stable Diffusion pipeline folder"""
    sd14: bool = False
    """instead of --model, SD-1.4-shaped random weights built in --models-dir (a GPU)"""
    models_dir: str = "bench_models"
    """where --sd14's models are built (once)"""
    prompts: str = "shapes"
    """the prompt set both sides draw from (tiny-sd was trained on 'shapes')"""
    num_steps: int = 20
    """DDIM steps"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """the frozen weights' dtype on both sides (the LoRA is fp32 in both)"""
    samples_per_epoch: int = 32
    """DDPO: images sampled per epoch"""
    sample_batch_size: int = 8
    """DDPO: images per sampling batch"""
    train_batch_size: int = 4
    """DDPO: trajectories per training batch (one optimizer step each)"""
    ddpo_learning_rate: float = 3e-2
    """DDPO: AdamW learning rate (ddpo.py --preset tiny's, so that 6 epochs move the held-out reward; not the speed)"""
    ddpo_timesteps_per_call: int = 1
    """DDPO: ddpo.py's --timesteps-per-call (TRL always trains one timestep per UNet call: the same rows, more calls)"""
    batch_size: int = 4
    """DRaFT-1: images per optimizer step"""
    draft_learning_rate: float = 4e-4
    """DRaFT-1: AdamW learning rate"""
    ddpo_epochs: int = 6
    """DDPO epochs per run (the first and the last are not timed)"""
    draft_steps: int = 20
    """DRaFT-1 optimizer steps per run (the first and the last are not timed)"""
    repeats: int = 3
    """runs of each side per pair"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS too); 0 leaves torch's default"""
    seed: int = 1
    """seed of both sides"""
    out: str = "docs/results/trl_trainers.json"
    """every run's numbers, as JSON"""


def default_resolution(model: str) -> int:
    """The image size TRL's pipeline samples at: the UNet's sample_size times the VAE's downsampling."""
    with open(os.path.join(model, "unet", "config.json")) as f:
        sample_size = json.load(f)["sample_size"]
    with open(os.path.join(model, "vae", "config.json")) as f:
        return sample_size * 2 ** (len(json.load(f)["block_out_channels"]) - 1)


def optimizer_settings(param_groups: list[dict]) -> dict:
    group = param_groups[0]
    return {
        "lr": group["lr"],
        "betas": list(group["betas"]),
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
    }


def run_ours(pair: str, args: Args, model: str, meter: Meter) -> dict:
    """Our script, run in this process as `python script.py ...`, with the meter on its UNet and its training loop."""
    flags = dict(
        pretrained_model=model,
        reward="colorfulness",
        prompts=args.prompts,
        resolution=default_resolution(model),
        num_steps=args.num_steps,
        guidance_scale=args.guidance_scale,
        lora_rank=LORA_RANK,
        mixed_precision="no" if args.precision == "fp32" else "bf16",
        seed=args.seed,
        weight_decay=WEIGHT_DECAY[pair],
        sample_every=10**6,  # no grids on the way (the scripts still draw one at the start and the end)
        save_every=10**6,
    )
    if pair == "ddpo":
        flags.update(
            estimator="is",
            eta=1.0,
            num_epochs=args.ddpo_epochs,
            samples_per_epoch=args.samples_per_epoch,
            sample_batch_size=args.sample_batch_size,
            train_batch_size=args.train_batch_size,
            learning_rate=args.ddpo_learning_rate,
            timesteps_per_call=args.ddpo_timesteps_per_call,
        )
    else:
        flags.update(
            k=1,
            eta=0.0,
            train_steps=args.draft_steps,
            batch_size=args.batch_size,
            learning_rate=args.draft_learning_rate,
        )
    run, metrics = run_script(PAIRS[pair][0], flags, meter)
    a = run["args"]
    settings = {
        "image_size": a.resolution,
        "num_steps": a.num_steps,
        "guidance_scale": a.guidance_scale,
        "eta": a.eta,
        "lora_rank": a.lora_rank,
        "lora_parameters": sum(p.numel() for p in run["lora_params"]),
        "unet_dtype": str(run["model"].denoiser.conv_in.weight.dtype),
        "max_grad_norm": a.max_grad_norm,
        **optimizer_settings(run["optimizer"].param_groups),
    }
    if pair == "ddpo":
        settings.update(
            samples_per_epoch=a.samples_per_epoch,
            sample_batch_size=a.sample_batch_size,
            train_batch_size=a.train_batch_size,
            batches_per_optimizer_step=a.grad_accum_steps,
            inner_epochs=a.num_inner_epochs,
            timestep_fraction=a.timestep_fraction,
            clip_range=a.clip_range,
            adv_clip_max=a.adv_clip_max,
            per_prompt_buffer=a.per_prompt_buffer,
            per_prompt_min_count=a.per_prompt_min_count,
        )
        images = a.samples_per_epoch
    else:
        settings.update(batch_size=a.batch_size, batches_per_optimizer_step=a.grad_accum_steps, gradient_steps=a.k)
        images = a.batch_size * a.grad_accum_steps
    return {
        **meter.result(images),
        "timesteps_per_call": getattr(a, "timesteps_per_call", 1),
        "settings": settings,
        "rewards": [m["reward_mean"] for m in metrics],
        "eval_reward": [metrics[0]["eval_reward_mean"], metrics[-1]["eval_reward_mean"]],
    }


def run_trl(pair: str, args: Args, model: str, meter: Meter) -> dict:
    """TRL's trainer on the same settings, stepped by hand so that each iteration is timed like ours."""
    import warnings

    from accelerate import PartialState
    from trl import AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from common.rewards import make_reward
    from common.sampling import sample

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # both trainers are deprecated in 0.23
    PartialState()  # TRL's pipeline logs through accelerate, which needs its state first
    pipeline = DefaultDDPOStableDiffusionPipeline(model, use_lora=True)
    train_prompts, eval_prompts = split_prompts(load_prompts(args.prompts))
    prompt_rng, reward = random.Random(args.seed), make_reward("colorfulness")

    def reward_fn(images, prompts, metadata):  # TRL's signature: images in [0, 1], as from our decode
        rewards = reward(images, list(prompts))
        meter.add_rewards(rewards)
        return rewards, {}

    def prompt_fn():
        return prompt_rng.choice(train_prompts), {}

    iterations = args.ddpo_epochs if pair == "ddpo" else args.draft_steps
    shared = dict(
        num_epochs=iterations,
        seed=args.seed,
        mixed_precision="no" if args.precision == "fp32" else "bf16",
        sample_num_steps=args.num_steps,
        sample_guidance_scale=args.guidance_scale,
        train_adam_weight_decay=WEIGHT_DECAY[pair],
        save_freq=10**9,
    )
    if pair == "ddpo":
        config = DDPOConfig(
            **shared,
            sample_eta=1.0,
            sample_batch_size=args.sample_batch_size,
            sample_num_batches_per_epoch=args.samples_per_epoch // args.sample_batch_size,
            train_batch_size=args.train_batch_size,
            train_learning_rate=args.ddpo_learning_rate,
            per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=16,
            per_prompt_stat_tracking_min_count=16,
        )
        trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    else:
        config = AlignPropConfig(
            **shared,
            sample_eta=0.0,
            train_batch_size=args.batch_size,
            train_learning_rate=args.draft_learning_rate,
            truncated_backprop_rand=False,
            truncated_backprop_timestep=args.num_steps - 1,
        )
        trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.register_forward_pre_hook(meter.unet_call, with_kwargs=True)
    # our scripts' evaluation (common/run.py's Run.evaluate), on TRL's modules (the same UNet object, LoRA included)
    resolution = pipeline.unet.config.sample_size * pipeline.sd_pipeline.vae_scale_factor
    ours = pipeline_model(pipeline.sd_pipeline, resolution)

    @torch.no_grad()
    def evaluate() -> float:
        pipeline.unet.eval()  # TRL leaves it in train mode after a step
        latents = ours.initial_latents(len(eval_prompts) * 2, torch.Generator().manual_seed(args.seed))
        x0, _ = sample(ours, latents, ours.encode(eval_prompts * 2), args.num_steps, args.guidance_scale)
        return reward(ours.decode(x0), eval_prompts * 2).mean().item()

    eval_before, global_step = evaluate(), 0
    for epoch in meter.loop(range(iterations)):
        global_step = trainer.step(epoch, global_step)
    eval_after = evaluate()

    lora = [p for p in pipeline.unet.parameters() if p.requires_grad]
    settings = {
        "image_size": resolution,
        "num_steps": config.sample_num_steps,
        "guidance_scale": config.sample_guidance_scale,
        "eta": config.sample_eta,
        "lora_rank": pipeline.unet.peft_config["default"].r,
        "lora_parameters": sum(p.numel() for p in lora),
        "unet_dtype": str(pipeline.unet.conv_in.weight.dtype),
        "max_grad_norm": config.train_max_grad_norm,
        **optimizer_settings(trainer.optimizer.param_groups),
    }
    if pair == "ddpo":
        tracking = config.per_prompt_stat_tracking
        settings.update(
            samples_per_epoch=config.sample_batch_size * config.sample_num_batches_per_epoch,
            sample_batch_size=config.sample_batch_size,
            train_batch_size=config.train_batch_size,
            batches_per_optimizer_step=config.train_gradient_accumulation_steps,
            inner_epochs=config.train_num_inner_epochs,
            timestep_fraction=config.train_timestep_fraction,
            clip_range=config.train_clip_range,
            adv_clip_max=config.train_adv_clip_max,
            per_prompt_buffer=config.per_prompt_stat_tracking_buffer_size if tracking else None,
            per_prompt_min_count=config.per_prompt_stat_tracking_min_count if tracking else None,
        )
        images = settings["samples_per_epoch"]
    else:
        settings.update(
            batch_size=config.train_batch_size,
            batches_per_optimizer_step=config.train_gradient_accumulation_steps,
            gradient_steps=None
            if config.truncated_backprop_rand
            else config.sample_num_steps - config.truncated_backprop_timestep,
        )
        images = config.train_batch_size * config.train_gradient_accumulation_steps
    rewards = [torch.cat(meter.rewards[i]).mean().item() for i in sorted(meter.rewards)]
    return {**meter.result(images), "settings": settings, "rewards": rewards, "eval_reward": [eval_before, eval_after]}


def run_child(side: str, pair: str, args: Args, model: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, os.path.abspath(__file__), "--child", side, pair, model, json.dumps(asdict(args))]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    last = (result.stderr.strip().splitlines() or [""])[-1]
    if result.returncode == 2 and last.startswith("error: "):  # a script refused a setting: its one sentence
        fail(f"the {side} run of {pair}: {last.removeprefix('error: ')}")
    if result.returncode != 0 or not lines:
        sys.exit(f"the {side} run of {pair} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4 * max(abs(a), abs(b))
    return a == b


def check_same_work(pair: str, ours: dict, theirs: dict) -> list[str]:
    """The table of what both sides hold and compute; ends the benchmark if any line differs."""
    lines = [f"| {pair} | ours | TRL | same |", "|-|-|-|-|"]
    batched = ours.get("timesteps_per_call", 1) > 1  # the same rows in fewer UNet calls: the calls are not compared
    compared = [
        *((k, ours["settings"][k], theirs["settings"].get(k)) for k in ours["settings"]),
        *((k, ours["work"][k], theirs["work"][k]) for k in ours["work"] if not (batched and k == "unet_evaluations")),
        ("eval reward before training", ours["eval_reward"][0], theirs["eval_reward"][0]),
    ]
    for name, a, b in compared:
        lines.append(f"| {name} | {a} | {b} | {'yes' if same(a, b) else 'NO'} |")
    lines.append(f"| (recomputed UNet calls: not compared) | {ours['recomputations']} | {theirs['recomputations']} | |")
    if batched:
        lines.append(f"| (UNet calls, ours {ours['timesteps_per_call']} timesteps a call: not compared) |"
                     f" {ours['work']['unet_evaluations']} | {theirs['work']['unet_evaluations']} | |")  # fmt: skip
    print("\n".join(lines), flush=True)
    if not all(same(a, b) for _, a, b in compared):
        sys.exit(f"{pair}: the two sides do not do the same work (the lines marked NO above)")
    return lines


def summarise(pair: str, ours: list[dict], theirs: list[dict]) -> dict:
    """A pair's numbers: images/s of each side, ours / TRL per repeat (by wall time and by CPU time), peak memory
    (on the CPU: the peak resident set; the rise in training in brackets), and the evaluation reward of each side."""
    ratios = [a["images_per_sec"] / b["images_per_sec"] for a, b in zip(ours, theirs)]
    cpu_ratios = [a["images_per_cpu_sec"] / b["images_per_cpu_sec"] for a, b in zip(ours, theirs)]
    cuda = ours[0]["peak_cuda_gb"] is not None

    def memory(runs: list[dict]) -> str:
        if cuda:
            return median_range([r["peak_cuda_gb"] for r in runs])
        peak, rise = (median_range([r[key] for r in runs], 3) for key in ("peak_rss_gb", "rss_rise_gb"))
        return f"{peak} [{rise}]"

    learned = [" -> ".join(f"{r:.2f}" for r in runs[0]["eval_reward"]) for runs in (ours, theirs)]
    table = [
        median_range([r["images_per_sec"] for r in ours], 3),
        median_range([r["images_per_sec"] for r in theirs], 3),
        median_range(ratios),
        median_range(cpu_ratios) if not cuda else "n/a",
        memory(ours),
        memory(theirs),
        *learned,
    ]
    return {
        "pair": pair,
        "ratio": statistics.median(ratios),
        "cpu_ratio": statistics.median(cpu_ratios),
        "table": table,
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # trl_trainers.py --child SIDE PAIR MODEL ARGS_JSON
        side, pair, model, settings = sys.argv[2:6]
        args = Args(**json.loads(settings))
        if args.threads:
            torch.set_num_threads(args.threads)
        meter = Meter()
        result = (run_ours if side == "ours" else run_trl)(pair, args, model, meter)
        print("RESULT " + json.dumps({"side": side, "pair": pair, **result}), flush=True)
        raise SystemExit(0)
    args = tyro.cli(Args)
    try:
        trl_version = version("trl")
    except PackageNotFoundError:
        fail(f"TRL is not installed: pip install --no-deps -r {REQUIREMENTS}")
    if trl_version != "0.23.1":
        fail(f"this benchmark compares with TRL 0.23.1 (found {trl_version}): pip install --no-deps -r {REQUIREMENTS}")
    if set(args.pairs) - set(PAIRS):
        fail(f"unknown pair(s) {sorted(set(args.pairs) - set(PAIRS))}; choose from: {', '.join(PAIRS)}")
    for name in ("repeats", "ddpo_epochs", "draft_steps", "threads"):  # the first and last iterations are not timed
        least = {"repeats": 1, "threads": 0}.get(name, 3)
        if getattr(args, name) < least:
            fail(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.sd14:
        model = os.path.abspath(build_models(args.models_dir, tiny=False))
    else:
        model = os.path.abspath(args.model)
    runs = {pair: {"ours": [], "trl": []} for pair in args.pairs}
    tables = {}
    for repeat in range(args.repeats):
        for pair in args.pairs:
            for side in ("ours", "trl") if repeat % 2 == 0 else ("trl", "ours"):
                result = run_child(side, pair, args, model)
                runs[pair][side].append(result)
                print(f"repeat {repeat} {pair} {side}: {result['images_per_sec']:.3f} images/s", flush=True)
            if repeat == 0:
                tables[pair] = check_same_work(pair, runs[pair]["ours"][0], runs[pair]["trl"][0])

    versions = {name: version(name) for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "trl")}
    first = runs[args.pairs[0]]["ours"][0]
    device = f"{first['device']}, {first['threads']} thread(s) per run"
    summary = [summarise(pair, runs[pair]["ours"], runs[pair]["trl"]) for pair in args.pairs]
    report = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "model": model,
        "command": " ".join(["python", *sys.argv]),
        "args": asdict(args),
        "same_work": tables,
        "summary": summary,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{device}, {report['date']}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("median (min-max) over the repeats; ours / TRL: over the pairs of runs of a repeat")
    print(
        "| pair | ours images/s | TRL images/s | ours / TRL | ours / TRL per CPU second | peak memory (GB): ours |"
        " TRL | eval reward before -> after: ours | TRL |\n|-|-|-|-|-|-|-|-|-|"
    )
    for s in summary:
        print(" | ".join(["", f"{PAIRS[s['pair']][0]} vs {PAIRS[s['pair']][1]}", *s["table"], ""]).strip())
