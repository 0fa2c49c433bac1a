"""Train the tiny text-to-image model shipped in assets/tiny-sd, from scratch on a CPU, in the Stable Diffusion 1.x
pipeline format (CLIP tokenizer and text encoder, UNet2DConditionModel with cross-attention, AutoencoderKL, DDIM with
SD's betas), so that the project's scripts can run for real without a GPU or a download.

Its world (common/shapes.py), drawn in code: a 32 x 32 px image of one shape (circle, square or triangle) in one
colour on a plain background of another, captioned "a {colour} {shape} on a {background} background" (the 90 prompts
of common.prompts.PROMPT_SETS["shapes"]). Stage 1 trains the VAE (scale factor 4: 32 px -> 4 x 8 x 8 latents); stage 2
trains the UNet and the text encoder together with SD's denoising loss (epsilon prediction, 10% empty prompts for
classifier-free guidance); stage 3 saves with StableDiffusionPipeline.save_pretrained, loads it back through
common.models.load_model and measures how often samples follow their prompts (numbers in assets/README.md).

    python assets/train_tiny_sd.py                    # the shipped model: 27 minutes on one CPU core
    python assets/train_tiny_sd.py --vae-steps 10 --unet-steps 10 --output-dir /tmp/tiny-sd --grid ""  # smoke run
"""

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for common/
from common.cli import fail  # noqa: E402
from common.models import load_model  # noqa: E402
from common.prompts import COLOURS, PROMPT_SETS, SHAPES  # noqa: E402
from common.rewards import Colorfulness  # noqa: E402
from common.sampling import sample  # noqa: E402
from common.shapes import FILL_RATIO, MAX_SIZE, accuracy, describe, draw, parse, random_captions  # noqa: E402


@dataclass
class Args:
    seed: int = 0
    """seed of the model initialisation and of the drawn training images"""
    threads: int = 1
    """CPU threads for torch (the shipped model was trained with 1)"""

    # Algorithm specific arguments
    output_dir: str = "assets/tiny-sd"
    """where the pipeline is saved (StableDiffusionPipeline.save_pretrained)"""
    grid: str = "assets/tiny-sd-samples.png"
    """where a grid of samples is saved ("" for none)"""
    resolution: int = 32
    """image side in pixels"""
    vae_steps: int = 2000
    """VAE training steps"""
    vae_batch_size: int = 16
    """images per VAE step"""
    vae_lr: float = 2e-3
    """AdamW peak learning rate of the VAE (linear warm-up, cosine decay to 0)"""
    kl_weight: float = 1e-6
    """weight of the KL term against the squared error, both summed over an image's dims (SD's VAE: 1e-6)"""
    unet_steps: int = 4500
    """UNet and text encoder training steps"""
    unet_batch_size: int = 32
    """images per UNet step"""
    unet_lr: float = 1e-3
    """AdamW peak learning rate of the UNet and text encoder (linear warm-up, cosine decay to 0)"""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting min(SNR_t, gamma) / SNR_t (Hang et al., 2023, arXiv 2303.09556): converges faster"""
    warmup_steps: int = 100
    """steps of linear learning-rate warm-up, in both stages"""
    empty_prompt_prob: float = 0.1
    """fraction of captions replaced by "" so that the model learns the unconditional eps (classifier-free guidance)"""
    eval_samples_per_prompt: int = 4
    """samples per prompt in the final measurement"""
    eval_steps: int = 20
    """DDIM steps of the final measurement"""
    guidance_scale: float = 5.0
    """classifier-free guidance of the final measurement"""


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer: a real CLIPTokenizer (byte-level BPE) whose vocabulary holds the world's words whole
def byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def make_tokenizer(words) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the byte alphabet plus `words`, merged left to right."""
    alphabet = byte_alphabet()
    vocab = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((parts[0], parts[1]))
            parts = [merged, *parts[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def make_t5_tokenizer(words):
    """A T5 tokenizer (SentencePiece-style Unigram over lower-cased words with the "▁" word marker, </s> appended)
    whose vocabulary is the letters plus `words`, each word one token: SD 3's third tokenizer in miniature."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{word}", -1.0) for word in dict.fromkeys(words)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)  # fmt: skip


def lr_lambda(steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to 0 (the decay stands in for an EMA of the weights)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps))


def measure(model, seed: int, samples_per_prompt: int, num_steps: int, guidance_scale: float) -> dict:
    """Sample each prompt of the world `samples_per_prompt` times and print how often the samples follow their prompt,
    the fill ratio of each shape and the colourfulness; returns the accuracy."""
    prompts = [p for p in PROMPT_SETS["shapes"] for _ in range(samples_per_prompt)]
    with torch.no_grad():
        latents = model.initial_latents(len(prompts), torch.Generator().manual_seed(seed))
        x0, _ = sample(model, latents, model.encode(prompts), num_steps, guidance_scale)
        images = model.decode(x0)
    colorfulness = Colorfulness()(images)
    descriptions = describe(images)
    follow = accuracy(descriptions, prompts)
    print(f"{len(prompts)} samples, {num_steps} DDIM steps, guidance {guidance_scale}: follow their prompt {follow}")
    for shape in SHAPES:
        fills = [d["fill"] for d, p in zip(descriptions, prompts) if parse(p)["shape"] == shape]
        print(f"  fill ratio of {shape}s: {np.mean(fills):.3f} +- {np.std(fills):.3f} (drawn: {FILL_RATIO[shape]:.3f})")
    print(f"colorfulness: {colorfulness.mean():.1f} +- {colorfulness.std():.1f} over all samples")
    for colour in COLOURS:
        values = [c for c, p in zip(colorfulness.tolist(), prompts) if parse(p)["colour"] == colour]
        print(f"  {colour} shapes: {np.mean(values):.1f} +- {np.std(values):.1f}")
    return follow


def save_grid(model, path: str, seed: int, num_steps: int, guidance_scale: float) -> None:
    """A PNG of 30 samples: rows are the shape's colour, columns the other five backgrounds, shapes in turn; 3x
    nearest upscale."""
    grid_prompts = [
        f"a {colour} {SHAPES[(row + col) % 3]} on a {background} background"
        for row, colour in enumerate(COLOURS)
        for col, background in enumerate(c for c in COLOURS if c != colour)
    ]
    with torch.no_grad():
        latents = model.initial_latents(len(grid_prompts), torch.Generator().manual_seed(seed))
        x0, _ = sample(model, latents, model.encode(grid_prompts), num_steps, guidance_scale)
        grid = model.decode(x0)  # (30, 3, H, W)
    side = model.resolution
    grid = grid.view(len(COLOURS), len(COLOURS) - 1, 3, side, side).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(len(COLOURS) * side, (len(COLOURS) - 1) * side, 3)
    grid = (grid * 255).round().to(torch.uint8).repeat_interleave(3, 0).repeat_interleave(3, 1).numpy()
    Image.fromarray(grid).save(path)
    print(f"saved {path}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.resolution % 4 or args.resolution <= MAX_SIZE:
        fail(f"--resolution must be a multiple of 4 (the VAE's scale factor) above {MAX_SIZE} (the largest shape)")
    if min(args.vae_steps, args.unet_steps, args.warmup_steps) < 1:
        fail("--vae-steps, --unet-steps and --warmup-steps must each be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # the training images
    start_time = time.time()

    # -----------------------------------------------------------------------------------------------------------------
    # Models: SD's layout at a fraction of its width and depth
    words = sorted({word for prompt in PROMPT_SETS["shapes"] for word in prompt.split()})
    tokenizer = make_tokenizer(words)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
        sample_size=args.resolution,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=args.resolution // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
    )  # fmt: skip
    for name, module in [("text encoder", text_encoder), ("vae", vae), ("unet", unet)]:
        print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters")

    # -----------------------------------------------------------------------------------------------------------------
    # Stage 1: the VAE, for reconstruction (squared error) with SD's light KL pull towards N(0, I)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.vae_steps, args.warmup_steps))
    for step in range(args.vae_steps):
        shapes, colours, backgrounds, _ = random_captions(args.vae_batch_size, generator)
        images = draw(shapes, colours, backgrounds, args.resolution, generator) * 2 - 1  # the VAE works in [-1, 1]
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        squared_error = ((reconstruction - images) ** 2).sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()  # summed over the latent dims
        loss = squared_error + args.kl_weight * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            mse = squared_error.item() / images[0].numel()
            print(f"vae step {step}: mse {mse:.5f}, kl {kl.item():.1f} ({time.time() - start_time:.0f} s)")
    vae.requires_grad_(False).eval()

    with torch.no_grad():  # held-out images: reconstruction quality, and SD's latent scaling (unit variance)
        shapes, colours, backgrounds, captions = random_captions(512, torch.Generator().manual_seed(args.seed + 1))
        images = draw(shapes, colours, backgrounds, args.resolution, torch.Generator().manual_seed(args.seed + 1))
        latents = vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(args.seed + 1))
        reconstruction = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        psnr = -10 * torch.log10(((reconstruction - images) ** 2).mean(dim=(1, 2, 3))).mean()
        vae_accuracy = accuracy(describe(reconstruction), captions)
        vae.register_to_config(scaling_factor=round(1 / latents.std().item(), 5))
    print(f"vae: PSNR {psnr:.1f} dB; reconstructions read back right {vae_accuracy}; scaling factor"
          f" {vae.config.scaling_factor}")  # fmt: skip

    # -----------------------------------------------------------------------------------------------------------------
    # Stage 2: the UNet and the text encoder together, SD's loss
    #   || eps - eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, c) ||^2
    # weighted by min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t): the nearly clean steps count less
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.unet_steps, args.warmup_steps))
    abar = scheduler.alphas_cumprod
    for step in range(args.unet_steps):
        shapes, colours, backgrounds, captions = random_captions(args.unet_batch_size, generator)
        images = draw(shapes, colours, backgrounds, args.resolution, generator)
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.sample(generator)
            latents = latents * vae.config.scaling_factor  # (B, 4, 8, 8)
        drop = torch.rand(len(captions), generator=generator) < args.empty_prompt_prob
        captions = ["" if d else c for c, d in zip(captions, drop)]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        prompt_embeds = text_encoder(ids)[0]  # (B, 77, 64)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        abar_t = abar[t].view(-1, 1, 1, 1)
        noisy_latents = abar_t.sqrt() * latents + (1 - abar_t).sqrt() * noise
        eps = unet(noisy_latents, t, encoder_hidden_states=prompt_embeds).sample
        squared_error = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        snr = abar[t] / (1 - abar[t])
        loss = (squared_error * snr.clamp(max=args.min_snr_gamma) / snr).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0 or step == args.unet_steps - 1:
            print(f"unet step {step}: loss {loss.item():.4f} ({time.time() - start_time:.0f} s)")

    # -----------------------------------------------------------------------------------------------------------------
    # Stage 3: save as a plain SD pipeline, load it back as the fine-tuning scripts do, measure prompt following
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(args.output_dir)
    train_time = time.time() - start_time
    print(f"saved {args.output_dir} after {train_time / 60:.1f} minutes")

    model = load_model(args.output_dir, resolution=args.resolution)
    measure(model, args.seed, args.eval_samples_per_prompt, args.eval_steps, args.guidance_scale)
    if args.grid:
        save_grid(model, args.grid, args.seed, args.eval_steps, args.guidance_scale)
