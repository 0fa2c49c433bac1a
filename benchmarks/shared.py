"""What the three benchmark folders share; a file in one folder imports nothing else from another.

- mean_sd, median_range: statistics as the tables print them ("mean ± sd" over seeds, "median (min-max)" over
  repeated timings)
- device_name: the GPU's or the CPU's model name, for the tables
- Meter, run_script: a script run in this process, as `python script.py ...`, with its denoiser's calls counted and
  its training loop's iterations timed through common/hooks.py (speed/per_unet_call.py, peers/trl_trainers.py)
- pipeline_model: this project's SD Model on the modules of a loaded diffusers pipeline (TRL's), so that the scripts'
  own evaluation runs on the peer's UNet (peers/trl_trainers.py, results/trl_ddpo_task.py)
- build_models: SD-1.4-shaped random models, no downloads (speed/sd14_scale.py, peers/trl_trainers.py --sd14)
- build_family: SDXL-base- and SD-3.5-Medium-shaped random pipelines, no downloads (speed/gpu_check.py)
- count_all_attention: FlopCounterMode counts scaled_dot_product_attention on every device (speed/sd14_scale.py)
"""

import json
import os
import platform
import resource
import runpy
import statistics
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # each benchmark puts it on sys.path first
CLIP_ID, HEAD_ID = "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor"  # common/rewards.py's ids


# ----------------------------------------------------------------------------------------------------------------------
# statistics, as the tables print them


def mean_sd(values: list[float], digits: int = 1) -> str:
    """'mean ± sd' (the sample standard deviation) over seeds; one value alone as it is."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def median_range(values: list[float], digits: int = 2) -> str:
    """'median (min-max)' over repeated timings, whose outliers (a busy machine) a mean would follow."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:  # Linux: the CPU's model name
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------------------------
# a script's denoiser calls and training loop, metered


def rss() -> int:
    """This process's resident set, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Meter:
    """What one run measures: when each iteration starts, the UNet's work in the first one, rewards, memory."""

    def __init__(self):
        self.starts, self.cpu_starts, self.rewards, self.seen = [], [], {}, set()
        self.work = {"unet_evaluations": 0, "rows": 0, "latent_shape": None, "embeds_shape": None, "timesteps": set()}
        self.recomputations, self.rss_start, self.rss_peak, self.done = 0, 0, 0, False
        self.passes = []  # per iteration: UNet passes and rows with autograd off, and on (recomputations included)

    def loop(self, iterable):
        """Wraps a training loop: marks the start of each iteration and the end of the last."""
        for item in iterable:
            self.mark()
            yield item
        self.mark()
        self.done = True

    def mark(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())
        self.passes.append({"passes": 0, "rows": 0, "grad_passes": 0, "grad_rows": 0})
        if len(self.starts) == 1:
            self.rss_start = self.rss_peak = rss()
            threading.Thread(target=self.watch_rss, daemon=True).start()

    def watch_rss(self):
        while not self.done:
            self.rss_peak = max(self.rss_peak, rss())
            time.sleep(0.01)

    def unet_call(self, unet, args, kwargs):
        """A forward pre-hook on the UNet: counts every pass, and records the first iteration's evaluations."""
        sample, timestep, embeds = (list(args) + [None] * 3)[:3]
        sample = kwargs.get("sample", sample)
        if self.passes:
            grad = "grad_" if torch.is_grad_enabled() else ""
            self.passes[-1][grad + "passes"] += 1
            self.passes[-1][grad + "rows"] += len(sample)
        if len(self.starts) != 1:
            return
        timestep = torch.as_tensor(kwargs.get("timestep", timestep)).flatten().tolist()
        embeds = kwargs.get("encoder_hidden_states", embeds)
        key = (tuple(sample.shape), tuple(timestep), float(sample.double().sum()))
        if key in self.seen:  # the same input again: a checkpointed call recomputed in the backward pass
            self.recomputations += 1
            return
        self.seen.add(key)
        self.work["unet_evaluations"] += 1
        self.work["rows"] += len(sample)
        self.work["latent_shape"], self.work["embeds_shape"] = list(sample.shape[1:]), list(embeds.shape[1:])
        self.work["timesteps"].update(int(t) for t in timestep)

    def add_rewards(self, rewards: torch.Tensor):
        self.rewards.setdefault(len(self.starts), []).append(rewards.detach().float().cpu())

    def result(self, images_per_iteration: int) -> dict:
        """The timed iterations are all but the first (warm-up) and the last (the scripts draw their final grid)."""
        self.done = True
        seconds = [b - a for a, b in zip(self.starts, self.starts[1:])]
        cpu_seconds = [b - a for a, b in zip(self.cpu_starts, self.cpu_starts[1:])]
        timed, cpu_timed = seconds[1:-1] or seconds, cpu_seconds[1:-1] or cpu_seconds
        passes = self.passes[: len(seconds)][1:-1] or self.passes[: len(seconds)]  # those of the timed iterations
        timesteps = sorted(self.work["timesteps"], reverse=True)
        return {
            "device": device_name(),
            "threads": torch.get_num_threads(),
            "seconds": seconds,
            "images_per_sec": images_per_iteration * len(timed) / sum(timed),
            "images_per_cpu_sec": images_per_iteration * len(cpu_timed) / sum(cpu_timed),
            "work": {**self.work, "timesteps": f"{len(timesteps)}: {timesteps[0]} ... {timesteps[-1]}"},
            "recomputations": self.recomputations,
            "cpu_seconds": cpu_timed,
            "unet_passes": passes,
            "peak_cuda_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
            "rss_rise_gb": (self.rss_peak - self.rss_start) / 2**30,
        }


def run_script(script: str, flags: dict, meter: Meter) -> tuple[dict, list[dict]]:
    """`python script --flag value ...` in this process, with the meter on its denoiser and around its training loop
    (after the first evaluation), through common/hooks.py. Returns the script's globals at its end and its
    metrics.jsonl."""
    from common import hooks

    def meter_the_denoiser(model):
        model.denoiser.register_forward_pre_hook(meter.unet_call, with_kwargs=True)

    hooks.model_loaded.append(meter_the_denoiser)
    hooks.training_loop.append(meter.loop)
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            flags = {**flags, "output_dir": output_dir}
            sys.argv = [script, *(x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v)))]
            run = runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            (run_dir,) = os.listdir(output_dir)
            with open(os.path.join(output_dir, run_dir, "metrics.jsonl")) as f:
                return run, [json.loads(line) for line in f]
    finally:
        hooks.model_loaded.remove(meter_the_denoiser)
        hooks.training_loop.remove(meter.loop)


def pipeline_model(pipeline, resolution: int):
    """This project's Model (common/models.py) on a loaded StableDiffusionPipeline's own modules (the same UNet
    object, LoRA included), with the DDIM scheduler that load_model gives the scripts."""
    from diffusers import DDIMScheduler

    from common.families.sd import StableDiffusion

    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)  # as load_model: no clipping
    modules = [pipeline.tokenizer], [pipeline.text_encoder], pipeline.unet, pipeline.vae, scheduler
    return StableDiffusion({}, *modules, resolution, pipeline.unet.conv_in.weight.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# SD-1.4-shaped random models


def build_models(folder: str, tiny: bool) -> str:
    """SD-1.4-shaped random weights (or tiny ones): a pipeline folder, and CLIP ViT-L/14 + an aesthetic head in a
    Hugging Face cache layout under folder/hub, where `--reward aesthetic` finds them offline (HF_HUB_CACHE,
    HF_HUB_OFFLINE=1). Returns the pipeline folder; skips what exists."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel

    from assets.train_tiny_sd import make_tokenizer
    from common.prompts import SIMPLE_ANIMALS

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

    def snapshot(repo_id: str) -> str:  # where huggingface_hub looks for a hub id when offline
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


def build_family(folder: str, family: str, tiny: bool) -> str:
    """A random pipeline folder in the layout of SDXL base 1.0 (family "sdxl": UNet 2.6B, CLIP ViT-L and OpenCLIP
    bigG text encoders, Euler scheduler config) or SD 3.5 Medium ("sd35": MMDiT-X 2.5B with dual attention in its
    first 13 blocks and RMS q/k norms, the two CLIP encoders with projections, no T5, a flow scheduler at shift 3),
    with their published configs' shapes; tiny=True shrinks every width and depth (a CPU check of the plan). The
    tokenizers come from a small vocabulary. Weights are bf16 when a GPU builds them. Returns the folder; skips what
    exists."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from assets.train_tiny_sd import make_tokenizer
    from common.prompts import SIMPLE_ANIMALS

    path = os.path.join(folder, f"{family}-{'tiny' if tiny else 'random'}")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    torch.manual_seed(0)
    words = SIMPLE_ANIMALS + ["a", "an", "photo", "of", "the"]
    tokenizer, tokenizer_2 = make_tokenizer(words), make_tokenizer(words)
    tokenizer_2.pad_token = "!"  # OpenCLIP's padding

    def clip_text(tok, width, layers, heads, act, projection=None):
        config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                                hidden_act=act, projection_dim=projection or width, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)

    (w1, l1, h1), (w2, l2, h2) = ((32, 2, 4), (48, 2, 4)) if tiny else ((768, 12, 12), (1280, 32, 20))
    vae_blocks = (16, 32) if tiny else (128, 256, 512, 512)
    vae = dict(in_channels=3, out_channels=3, block_out_channels=vae_blocks, layers_per_block=1 if tiny else 2,
               down_block_types=("DownEncoderBlock2D",) * len(vae_blocks), norm_num_groups=8 if tiny else 32,
               up_block_types=("UpDecoderBlock2D",) * len(vae_blocks), sample_size=1024)  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of billions of weights: seconds on a GPU
    with torch.device(device):
        if family == "sdxl":
            text_encoder, text_encoder_2 = (
                clip_text(tokenizer, w1, l1, h1, "quick_gelu"),
                clip_text(tokenizer_2, w2, l2, h2, "gelu", projection=w2),
            )
            unet = UNet2DConditionModel(
                sample_size=128, in_channels=4, out_channels=4, layers_per_block=1 if tiny else 2,
                block_out_channels=(32, 64) if tiny else (320, 640, 1280),
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (1 if tiny else 2),
                up_block_types=("CrossAttnUpBlock2D",) * (1 if tiny else 2) + ("UpBlock2D",),
                transformer_layers_per_block=(1, 2) if tiny else (1, 2, 10),
                attention_head_dim=(2, 4) if tiny else (5, 10, 20), cross_attention_dim=w1 + w2,
                use_linear_projection=True, norm_num_groups=8 if tiny else 32, addition_embed_type="text_time",
                addition_time_embed_dim=8 if tiny else 256,
                projection_class_embeddings_input_dim=6 * (8 if tiny else 256) + w2,
            )  # fmt: skip
            pipeline = StableDiffusionXLPipeline(
                vae=AutoencoderKL(latent_channels=4, scaling_factor=0.13025, force_upcast=True, **vae),
                text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, add_watermarker=False,
                scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading"),
            )  # fmt: skip
        elif family == "sd35":
            text_encoder = clip_text(tokenizer, w1, l1, h1, "quick_gelu", projection=w1)
            text_encoder_2 = clip_text(tokenizer_2, w2, l2, h2, "gelu", projection=w2)
            layers, heads, head_dim = (2, 4, 8) if tiny else (24, 24, 64)
            transformer = SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=96 if tiny else 4096,
                caption_projection_dim=heads * head_dim, pooled_projection_dim=w1 + w2,
                pos_embed_max_size=16 if tiny else 384, qk_norm="rms_norm",
                dual_attention_layers=(0,) if tiny else tuple(range(13)),
            )  # fmt: skip
            pipeline = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=AutoencoderKL(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                                  use_quant_conv=False, use_post_quant_conv=False, **vae),
                text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
            )  # fmt: skip
        else:
            raise ValueError(f"unknown family {family!r}")
    if device == "cuda":
        pipeline.to(torch.bfloat16)
    pipeline.save_pretrained(path)
    return path


ATTENTION_OPS = [  # (op, backward?) that FlopCounterMode may lack a formula for (torch 2.13: the CPU kernels)
    ("_scaled_dot_product_flash_attention_for_cpu", False),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", True),
    ("_scaled_dot_product_cudnn_attention", False),
    ("_scaled_dot_product_cudnn_attention_backward", True),
]


def count_all_attention() -> list[str]:
    """Gives FlopCounterMode a formula, by the shapes, for each fused attention kernel it does not count: on the CPU,
    torch 2.13 counts no FLOPs for scaled_dot_product_attention (only the CUDA kernels have formulas). The formulas
    are torch's own for the CUDA kernels: forward 4 B H L S D (Q K^T and P V), backward 10 B H L S D (the scores
    recomputed and four products). Returns the ops it registered."""
    from torch.utils import flop_counter

    registered = []
    for name, backward in ATTENTION_OPS:
        op = getattr(torch.ops.aten, name, None)
        if op is None or op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
            continue

        def formula(*shapes, out_shape=None, backward=backward, **kwargs):
            if backward:  # (grad_out, query, key, value, ...)
                return flop_counter.sdpa_backward_flop_count(shapes[0], shapes[1], shapes[2], shapes[3])
            return flop_counter.sdpa_flop_count(shapes[0], shapes[1], shapes[2])

        flop_counter.register_flop_formula(op)(formula)
        registered.append(name)
    return registered


class FlopCounter:
    """Counts the FLOPs of every operation run while it is on, with FlopCounterMode's formulas (torch's registry,
    attention included after count_all_attention) but without its per-module tracking, whose backward hooks keep
    the activations that gradient checkpointing recomputes alive to the end of the backward pass: under
    FlopCounterMode, draft_full.py's memory grows with the number of steps (and ran out of a 141 GB GPU at SD 1.4's
    shapes and 50 steps), under this counter it does not."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        count_all_attention()
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.flops += formula(*args, **kwargs, out_val=out)
                return out

        self.flops, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
