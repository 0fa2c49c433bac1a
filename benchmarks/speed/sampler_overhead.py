"""The project's DDIM loop against diffusers' StableDiffusionPipeline, the same work side by side on the CPU.

    python benchmarks/speed/sampler_overhead.py --model assets/tiny-sd --resolution 32

Both start from the same x_T, with the same prompts, steps and guidance, and decode to images in [0, 1]; runs are
interleaved (ours, theirs, ours, ...) so that drifts in machine load hit both alike, and the medians compared.
"""

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.cli import fail, install_error_handling  # noqa: E402
from common.models import load_model  # noqa: E402
from common.sampling import sample  # noqa: E402


@dataclass
class Args:
    model: str = "assets/tiny-sd"
    """a Stable Diffusion pipeline folder"""
    resolution: int = 32
    """image size in pixels"""
    batch_size: int = 8
    """images per call"""
    num_steps: int = 50
    """DDIM steps"""
    guidance_scale: float = 7.5
    """classifier-free guidance weight"""
    repeats: int = 10
    """timed calls of each"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    if min(args.resolution, args.batch_size, args.num_steps, args.repeats) < 1:
        fail("--resolution, --batch-size, --num-steps and --repeats must be at least 1")
    install_error_handling()  # before diffusers' pipelines import transformers: its warnings say nothing about this
    import diffusers
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_grad_enabled(False)
    model = load_model(args.model, device="cpu", dtype=torch.float32, resolution=args.resolution,
                       num_steps=args.num_steps)  # fmt: skip
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.model, scheduler=DDIMScheduler.from_pretrained(args.model, subfolder="scheduler"), safety_checker=None
    )
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a white background"] * args.batch_size
    latents = model.initial_latents(args.batch_size, torch.Generator().manual_seed(0))

    def ours():
        # prompt encoding is part of the work, as in the pipeline call (ours encodes "" once, when it loads)
        x0, _ = sample(model, latents, model.encode(prompts), args.num_steps, args.guidance_scale)
        return model.decode(x0)

    def theirs():
        size = dict(height=args.resolution, width=args.resolution)
        return pipeline(prompts, num_inference_steps=args.num_steps, guidance_scale=args.guidance_scale,
                        latents=latents, output_type="pt", **size).images  # fmt: skip

    assert torch.allclose(ours(), theirs(), atol=1e-5)  # the same work (and a warm-up of each)
    times = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("diffusers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__},"
          f" diffusers {diffusers.__version__}; {args.model}, {args.batch_size} x {args.resolution} px,"
          f" {args.num_steps} steps, guidance {args.guidance_scale}")  # fmt: skip
    for name, t in times.items():
        print(f"{name:>9}: median {median[name]:.3f} s (min {min(t):.3f}, max {max(t):.3f}) over {args.repeats}")
    print(f"ratio ours / diffusers: {median['ours'] / median['diffusers']:.3f}")
