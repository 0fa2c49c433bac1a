"""Train the tiny text-to-image flow model shipped in assets/tiny-sd3, from scratch on a CPU, in exactly Stable
Diffusion 3's pipeline format (two CLIP text encoders with projections, a T5 encoder, an MMDiT SD3Transformer2DModel
predicting a rectified flow's velocity, AutoencoderKL with a shift factor, FlowMatchEulerDiscreteScheduler), so that
the project's scripts can show learning on a flow model without a GPU or a download.

Its world is tiny-sd's (common/shapes.py): one coloured shape on a plain background of another, 32 x 32 px, captioned
"a {colour} {shape} on a {background} background". Stage 1 takes tiny-sd's trained VAE (4 latent channels, scale
factor 4) and sets SD 3's shift_factor and scaling_factor from its latents' statistics; stage 2 trains the transformer
and the three text encoders together with the rectified-flow loss (x_t = (1 - sigma) x0 + sigma eps, target the
velocity eps - x0, sigma logit-normal as SD 3 trains, 10% empty prompts for classifier-free guidance); stage 3 saves
with StableDiffusion3Pipeline.save_pretrained, loads it back through common.models.load_model and measures how often
samples follow their prompts (numbers in assets/README.md).

    python assets/train_tiny_sd3.py                    # the shipped model: about 30 minutes on one CPU core
    python assets/train_tiny_sd3.py --steps 10 --output-dir /tmp/tiny-sd3 --grid ""  # smoke run
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for common/
from assets.train_tiny_sd import lr_lambda, make_t5_tokenizer, make_tokenizer, measure, save_grid  # noqa: E402
from common.cli import fail  # noqa: E402
from common.families.sd3 import T5_TOKENS  # noqa: E402
from common.models import load_model  # noqa: E402
from common.prompts import PROMPT_SETS  # noqa: E402
from common.shapes import MAX_SIZE, accuracy, describe, draw, random_captions  # noqa: E402


@dataclass
class Args:
    seed: int = 0
    """seed of the model initialisation and of the drawn training images"""
    threads: int = 1
    """CPU threads for torch (the shipped model was trained with 1)"""
    device: str = "cpu"
    """torch device of the training and the measurement (the shipped model was trained on the CPU)"""

    # Algorithm specific arguments
    output_dir: str = "assets/tiny-sd3"
    """where the pipeline is saved (StableDiffusion3Pipeline.save_pretrained)"""
    grid: str = "assets/tiny-sd3-samples.png"
    """where a grid of samples is saved ("" for none)"""
    vae_from: str = "assets/tiny-sd"
    """the pipeline whose trained VAE is reused (tiny-sd's: the world's images in 4 x 8 x 8 latents)"""
    resolution: int = 32
    """image side in pixels"""
    steps: int = 1500
    """training steps of the transformer and the text encoders"""
    patch_size: int = 2
    """the transformer's patch side in latent pixels (2: 16 image tokens per 8 x 8 latent; 1: 64)"""
    layers: int = 6
    """the transformer's MMDiT blocks"""
    batch_size: int = 32
    """images per step"""
    lr: float = 1e-3
    """AdamW peak learning rate (linear warm-up, cosine decay to 0)"""
    warmup_steps: int = 100
    """steps of linear learning-rate warm-up"""
    weighting: Literal["logit_normal", "uniform"] = "logit_normal"
    """how training sigmas are drawn before the shift: logit-normal(0, 1), SD 3's choice, or uniform in (0, 1)"""
    shift: float = 1.0
    """the flow scheduler's shift s, sigma -> s sigma / (1 + (s - 1) sigma), in training and sampling alike"""
    empty_prompt_prob: float = 0.1
    """fraction of captions replaced by "" so that the model learns the unconditional velocity (guidance)"""
    eval_samples_per_prompt: int = 4
    """samples per prompt in the final measurement"""
    eval_steps: int = 20
    """sampling steps of the final measurement"""
    guidance_scale: float = 5.0
    """classifier-free guidance of the final measurement"""


def encode(captions: list[str], tokenizers, text_encoders, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's conditioning as StableDiffusion3Pipeline.encode_prompt computes it, with gradient: both CLIP
    encoders' penultimate states side by side, padded to T5's width, then T5's 256 token states (B, 77 + 256, D);
    and both CLIP encoders' projected pooled embeddings side by side (B, P)."""
    states, pooled = [], []
    for tokenizer, text_encoder in zip(tokenizers[:2], text_encoders[:2]):
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        output = text_encoder(ids.to(device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled.append(output.text_embeds)
    ids = tokenizers[2](captions, padding="max_length", max_length=T5_TOKENS, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
    t5_states = text_encoders[2](ids.to(device))[0]
    clip_states = torch.cat(states, dim=-1)
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return torch.cat([clip_states, t5_states], dim=1), torch.cat(pooled, dim=-1)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.patch_size < 1 or args.resolution % (4 * args.patch_size) or args.resolution <= MAX_SIZE:
        fail(f"--resolution must be a multiple of 4 * --patch-size (the VAE's scale factor times the patch size)"
             f" above {MAX_SIZE}, and --patch-size at least 1")  # fmt: skip
    if min(args.steps, args.warmup_steps, args.layers) < 1 or args.shift <= 0:
        fail("--steps, --warmup-steps and --layers must each be at least 1, and --shift positive")
    if not os.path.isfile(os.path.join(args.vae_from, "vae", "config.json")):
        fail(f"--vae-from {args.vae_from} is not a pipeline folder with a vae/ (tiny-sd's is assets/tiny-sd)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # the training images, captions, sigmas and noise
    device = torch.device(args.device)
    start_time = time.time()

    # -----------------------------------------------------------------------------------------------------------------
    # Models: SD 3's layout at a fraction of its width and depth (SD 3: CLIP widths 768 and 1280, T5 4096, 24 MMDiT
    # blocks of width 1536); the CLIP states (32 + 64) are padded to T5's 96 as SD 3 pads 2048 to 4096
    words = sorted({word for prompt in PROMPT_SETS["shapes"] for word in prompt.split()})
    tokenizer, tokenizer_2, tokenizer_3 = make_tokenizer(words), make_tokenizer(words), make_t5_tokenizer(words)
    tokenizer_2.pad_token = "!"  # SD 3's second tokenizer (OpenCLIP's) pads with "!"
    text_encoders = [
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=width,
                intermediate_size=2 * width,
                projection_dim=width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act=act,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )  # fmt: skip
        for tok, width, act in [(tokenizer, 32, "quick_gelu"), (tokenizer_2, 64, "gelu")]
    ]
    text_encoders.append(T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=96, d_kv=24, d_ff=192, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )))  # fmt: skip
    tokenizers = [tokenizer, tokenizer_2, tokenizer_3]
    transformer = SD3Transformer2DModel(
        sample_size=args.resolution // 4, patch_size=args.patch_size, in_channels=4, out_channels=4,
        num_layers=args.layers, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=96,
        caption_projection_dim=64, pooled_projection_dim=32 + 64,
        pos_embed_max_size=args.resolution // 4 // args.patch_size,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=args.shift)
    vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae")
    for name, module in [("text encoders", text_encoders), ("transformer", [transformer]), ("vae", [vae])]:
        print(f"{name}: {sum(p.numel() for m in module for p in m.parameters()) / 1e6:.2f}M parameters")
    for module in [*text_encoders, transformer, vae]:
        module.to(device)

    # -----------------------------------------------------------------------------------------------------------------
    # Stage 1: tiny-sd's VAE, frozen. SD 3 maps its latents to (z - shift_factor) * scaling_factor: set both from
    # held-out latents so that the flow starts from data of mean 0 and variance 1, like its noise
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        shapes, colours, backgrounds, captions = random_captions(512, torch.Generator().manual_seed(args.seed + 1))
        images = draw(shapes, colours, backgrounds, args.resolution, torch.Generator().manual_seed(args.seed + 1))
        latents = vae.encode(images.to(device) * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(args.seed + 1))
        reconstruction = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1).cpu()
        vae.register_to_config(shift_factor=round(latents.mean().item(), 5),
                               scaling_factor=round(1 / latents.std().item(), 5))  # fmt: skip
    print(f"vae: reconstructions read back right {accuracy(describe(reconstruction), captions)}; shift factor"
          f" {vae.config.shift_factor}, scaling factor {vae.config.scaling_factor}")  # fmt: skip

    # -----------------------------------------------------------------------------------------------------------------
    # Stage 2: the transformer and the text encoders together, the rectified-flow loss
    #   || (eps - z_0) - v_theta((1 - sigma) z_0 + sigma eps, 1000 sigma, c) ||^2
    # with sigma drawn logit-normal (SD 3's best weighting: most training where the velocity is hardest to predict,
    # mid-way between data and noise) and shifted as the scheduler shifts its sampling sigmas
    params = [p for module in [transformer, *text_encoders] for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps, args.warmup_steps))
    for module in [transformer, *text_encoders]:
        module.train()
    for step in range(args.steps):
        shapes, colours, backgrounds, captions = random_captions(args.batch_size, generator)
        images = draw(shapes, colours, backgrounds, args.resolution, generator).to(device)
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.sample(generator)
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor  # (B, 4, 8, 8)
        drop = torch.rand(len(captions), generator=generator) < args.empty_prompt_prob
        captions = ["" if d else c for c, d in zip(captions, drop)]
        prompt_embeds, pooled_embeds = encode(captions, tokenizers, text_encoders, device)  # (B, 333, 96), (B, 96)
        if args.weighting == "logit_normal":
            sigmas = torch.sigmoid(torch.randn(len(latents), generator=generator))
        else:
            sigmas = torch.rand(len(latents), generator=generator)
        sigmas = (args.shift * sigmas / (1 + (args.shift - 1) * sigmas)).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy_latents = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        velocity = transformer(hidden_states=noisy_latents, timestep=1000 * sigmas, encoder_hidden_states=prompt_embeds,
                               pooled_projections=pooled_embeds).sample  # fmt: skip
        loss = F.mse_loss(velocity, noise - latents)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            elapsed = f"{time.time() - start_time:.0f} s, {time.process_time():.0f} s of CPU"
            print(f"step {step}: loss {loss.item():.4f} ({elapsed})", flush=True)

    # -----------------------------------------------------------------------------------------------------------------
    # Stage 3: save as a plain SD 3 pipeline, load it back as the fine-tuning scripts do, measure prompt following
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizer,
        text_encoder_2=text_encoders[1], tokenizer_2=tokenizer_2, text_encoder_3=text_encoders[2],
        tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipeline.to("cpu").save_pretrained(args.output_dir)
    train_time = time.time() - start_time
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.output_dir) for f in files)
    print(f"saved {args.output_dir} ({size / 1e6:.2f} MB) after {train_time / 60:.1f} minutes, of which"
          f" {time.process_time() / 60:.1f} of CPU (less where other work shares the core)")  # fmt: skip

    model = load_model(args.output_dir, device=device, dtype=torch.float32, resolution=args.resolution)
    measure(model, args.seed, args.eval_samples_per_prompt, args.eval_steps, args.guidance_scale)
    if args.grid:
        save_grid(model, args.grid, args.seed, args.eval_steps, args.guidance_scale)
