"""Speed and memory of the six scripts at Stable Diffusion 1.4 scale, on random weights (no downloads).

    python benchmarks/sd14_scale.py                        # on a GPU: builds the models once, then times each script
    python benchmarks/sd14_scale.py --scripts draft_k.py --extra-args "--mixed-precision no"   # one lever at a time
    python benchmarks/sd14_scale.py --levers channels_last  # a lever from outside the scripts (benchmarks/levers.py)
    python benchmarks/sd14_scale.py --tiny --steps 2       # a smoke run of this file on the CPU (tests use it)

1. Builds, in --models-dir, SD-1.4-shaped random models (SD 1.4's and CLIP ViT-L/14's configs): a pipeline folder
   (UNet 860M, VAE, CLIP text encoder, a tokenizer from a small vocabulary) and, in a Hugging Face cache layout,
   CLIP ViT-L/14 and an aesthetic head, so that `--reward aesthetic` resolves offline to them (HF_HUB_CACHE,
   HF_HUB_OFFLINE=1).
2. Runs each script as `python script.py ...` at 512 px with its default batch for --steps optimizer steps (DDPO and
   RWR: epochs of --samples-per-epoch images) and reads its metrics.jsonl: the median images/s over the steps after
   the first (the warm-up), and the peak GPU memory.
3. Counts the FLOPs of one step with torch's FlopCounterMode: the script runs in-process under the counter for 1 and
   for 2 steps, and the difference is one step (loading, the offline data and the sample grids cancel out). The
   model-FLOP utilisation is that count per second of a step over the device's dense bf16 peak. The count is taken
   without --levers: they change how fast the same work runs, not the work.
Prints a markdown table for docs/BENCHMARKS.md and writes the numbers to --out as JSON.
"""

import json
import os
import platform
import runpy
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from assets.train_tiny_sd import make_tokenizer  # noqa: E402
from benchmarks.levers import LEVERS  # noqa: E402
from common.prompts import SIMPLE_ANIMALS  # noqa: E402

CLIP_ID, HEAD_ID = "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor"  # common/rewards.py's ids
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity


@dataclass
class Args:
    models_dir: str = "bench_models"
    """where the random models are built (once) and read from"""
    scripts: list[str] = field(default_factory=lambda: ["draft_full.py", "draft_k.py", "draft_lv.py", "ddpo.py",
                                                        "rwr.py", "braid.py"])  # fmt: skip
    """the scripts to time"""
    steps: int = 5
    """optimizer steps (epochs for DDPO and RWR) timed per script; the first is the warm-up"""
    samples_per_epoch: int = 32
    """DDPO's and RWR's images per epoch here (their default 256 makes an epoch minutes long)"""
    extra_args: str = ""
    """passed to every script, one lever at a time, e.g. --extra-args '--mixed-precision no'"""
    levers: list[str] = field(default_factory=list)
    """levers switched on from outside the scripts (benchmarks/levers.py): tf32 channels_last fused_adamw compile"""
    count_flops: bool = True
    """count each step's FLOPs (two more short runs per script)"""
    peak_tflops: Optional[float] = None
    """the device's dense bf16 peak in TFLOP/s; by default looked up from the GPU's name"""
    tiny: bool = False
    """tiny shapes at 32 px instead of SD 1.4's at 512: to check this file on a CPU, not to measure"""
    out: str = "benchmarks/sd14_scale.json"
    """the numbers, as JSON"""


def build_models(folder: str, tiny: bool) -> str:
    """SD-1.4-shaped random weights (or tiny ones): a pipeline folder, and CLIP ViT-L/14 + an aesthetic head in a
    Hugging Face cache layout under folder/hub. Returns the pipeline folder; skips what exists."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel

    pipeline_dir = os.path.join(folder, "sd14-random" if not tiny else "tiny-random")
    if os.path.isfile(os.path.join(pipeline_dir, "model_index.json")):
        return pipeline_dir
    torch.manual_seed(0)
    tokenizer = make_tokenizer(SIMPLE_ANIMALS + ["a", "an", "photo", "of", "the"])
    width, blocks = (32, (32, 64, 64, 64)) if tiny else (768, (320, 640, 1280, 1280))
    text = dict(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2 if tiny else 12,
                num_attention_heads=4 if tiny else 12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=blocks, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=width, attention_head_dim=8,
        norm_num_groups=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64) if tiny else (128, 256, 512, 512),
        layers_per_block=2, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False)  # fmt: skip
    StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(pipeline_dir)  # fmt: skip

    # the reward's models, where huggingface_hub looks for the hub ids when offline
    def snapshot(repo_id: str) -> str:
        repo = os.path.join(folder, "hub", "models--" + repo_id.replace("/", "--"))
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write("0" * 40)
        return os.path.join(repo, "snapshots", "0" * 40)

    vision = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, hidden_act="quick_gelu")  # fmt: skip
    if tiny:
        vision.update(patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    clip_dir = snapshot(CLIP_ID)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(clip_dir)
    head_dir = snapshot(HEAD_ID)
    os.makedirs(head_dir, exist_ok=True)
    sizes = [(width, 1024, 0), (1024, 128, 2), (128, 64, 4), (64, 16, 6), (16, 1, 7)]  # LAION's layers.N layout
    head = {}
    for fan_in, fan_out, index in sizes:
        layer = torch.nn.Linear(fan_in, fan_out)
        head[f"layers.{index}.weight"], head[f"layers.{index}.bias"] = layer.weight.data, layer.bias.data
    torch.save(head, os.path.join(head_dir, "aesthetic-model.pth"))
    return pipeline_dir


def script_args(script: str, model: str, steps: int, args: Args) -> list[str]:
    """The script at SD 1.4 scale with its default batch, `steps` steps, no grids or checkpoints on the way."""
    resolution = ["--resolution", "32", "--num-steps", "4"] if args.tiny else ["--resolution", "512"]
    common = ["--pretrained-model", model, *resolution, "--sample-every", "100000", "--save-every", "100000"]
    if script in ("ddpo.py", "rwr.py"):
        length = ["--num-epochs", str(steps), "--samples-per-epoch", str(args.samples_per_epoch),
                  "--reward", "jpeg_compressibility"]  # fmt: skip
    elif script == "braid.py":  # a small offline set: its synthesis is not what is timed
        length = ["--train-steps", str(steps), "--offline-size", "16", "--labeler", "aesthetic"]
    else:
        length = ["--train-steps", str(steps), "--reward", "aesthetic"]
    return [*common, *length, *shlex.split(args.extra_args)]


def images_per_step(script: str, args: Args) -> int:
    """The images a script's images_per_sec counts in one step (an epoch for DDPO and RWR), at its defaults."""
    if script in ("ddpo.py", "rwr.py"):
        return args.samples_per_epoch
    defaults = runpy.run_path(os.path.join(ROOT, script))["Args"]()  # the script's definitions, not its training
    extra = shlex.split(args.extra_args)
    flags = dict(zip(extra[::2], extra[1::2]))  # e.g. --batch-size 1 among the levers
    batch = int(flags.get("--batch-size", defaults.batch_size)) * int(
        flags.get("--grad-accum-steps", defaults.grad_accum_steps)
    )
    return batch * int(flags.get("--n", getattr(defaults, "n", 1)))  # DRaFT-LV scores n copies of each


def count_flops(script: str, script_args: list[str]) -> int:
    """Total FLOPs of running the script in this process (called in a child process)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.argv = [script, *script_args]
    with FlopCounterMode(display=False) as counter:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return counter.get_total_flops()


def run(command: list[str], env: dict) -> str:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


if __name__ == "__main__":
    if (
        len(sys.argv) > 2 and sys.argv[1] == "--count-flops-child"
    ):  # python sd14_scale.py --count-flops-child script ...
        print("FLOPS", count_flops(sys.argv[2], sys.argv[3:]))
        raise SystemExit(0)
    args = tyro.cli(Args)
    if set(args.levers) - set(LEVERS):
        raise SystemExit(f"unknown lever(s) {sorted(set(args.levers) - set(LEVERS))}; choose from: {', '.join(LEVERS)}")
    cuda = torch.cuda.is_available()
    model = build_models(args.models_dir, args.tiny)
    env = dict(os.environ, HF_HUB_CACHE=os.path.abspath(os.path.join(args.models_dir, "hub")), HF_HUB_OFFLINE="1")
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if cuda else None
    results = []
    for script in args.scripts:
        with tempfile.TemporaryDirectory() as out:
            launcher = [os.path.join("benchmarks", "levers.py"), ",".join(args.levers)] if args.levers else []
            command = [sys.executable, *launcher, script, *script_args(script, model, args.steps, args),
                       "--output-dir", out]  # fmt: skip
            start = time.time()
            run(command, env)
            (run_dir,) = os.listdir(out)
            with open(os.path.join(out, run_dir, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f]
        timed = metrics[1:-1] or metrics  # the first step warms up; the last one draws the final sample grid
        result = {
            "script": script,
            "levers": args.levers,
            "images_per_sec": statistics.median(m["images_per_sec"] for m in timed),
            "peak_mem_gb": max((m.get("peak_mem_gb") or 0.0) for m in metrics) if cuda else None,
            "wall_s": time.time() - start,
        }
        if args.count_flops:
            flops = []
            for steps in (1, 2):
                with tempfile.TemporaryDirectory() as out:
                    child = [sys.executable, os.path.abspath(__file__), "--count-flops-child", script,
                             *script_args(script, model, steps, args), "--output-dir", out]  # fmt: skip
                    flops.append(int(run(child, env).split("FLOPS")[-1]))
            result["tflop_per_step"] = (flops[1] - flops[0]) / 1e12
            if peak:
                step_s = images_per_step(script, args) / result["images_per_sec"]
                result["mfu"] = result["tflop_per_step"] / step_s / peak
        results.append(result)
        print(json.dumps(result), flush=True)

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("diffusers", "transformers", "peft"):
        versions[package] = __import__(package).__version__
    report = {"device": name, "peak_bf16_tflops": peak, "date": time.strftime("%Y-%m-%d"), "versions": versions,
              "levers": args.levers, "command": " ".join(sys.argv), "results": results}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"\n{name}, {report['date']}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; levers: {', '.join(args.levers) or 'none'}"
    )
    print("| script | images/s | TFLOP per step | MFU (bf16 peak) | peak memory (GB) |\n|-|-|-|-|-|")
    for r in results:
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "n/a"
        tflop = f"{r['tflop_per_step']:.1f}" if "tflop_per_step" in r else "n/a"
        print(f"| {r['script']} | {r['images_per_sec']:.2f} | {tflop} | {mfu} | {mem} |")
