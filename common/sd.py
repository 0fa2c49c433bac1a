"""Stable Diffusion 1.x and 2.x: loading the frozen parts, LoRA on the UNet, prompt encoding."""

import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTokenizer

from common import fail, load_or_fail

SD14 = "CompVis/stable-diffusion-v1-4"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet's attention projections
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name: load_lora_weights finds it


@dataclass
class StableDiffusion:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler

    @property
    def vae_scale_factor(self) -> int:  # 8 for SD: a 512 px image has 64 x 64 latents
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_sd(model: str = SD14, revision: str | None = None, device="cpu", dtype=None, num_steps=1) -> StableDiffusion:
    """Tokenizer, text encoder, UNet and VAE from a hub id or a local pipeline folder, frozen, in eval mode,
    with a DDIMScheduler built from the model's scheduler config. The UNet predicts eps (SD 1.x, SD 2.x base) or v
    (SD 2.x at 768 px): `scheduler.config.prediction_type` says which, and ddim_step reads it. Frozen weights in
    bf16 on CUDA and fp32 elsewhere unless `dtype` is given; attention through PyTorch's
    scaled_dot_product_attention. `num_steps`, the DDIM steps the caller will take, is checked against the scheduler."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # the scheduler config is the smallest file: a wrong id or no network fails here, before any download
    scheduler_config = load_or_fail(DDIMScheduler.load_config, model, subfolder="scheduler", revision=revision)
    # SD never clips x0_hat (StableDiffusionPipeline turns clip_sample off too); ddim_step has no clipping
    scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        fail(f"'{model}' predicts '{scheduler.config.prediction_type}'; these scripts need a model that predicts "
             "'epsilon' (SD 1.x, SD 2.x base) or 'v_prediction' (SD 2.x at 768 px)")  # fmt: skip
    if num_steps > scheduler.config.num_train_timesteps:
        steps = scheduler.config.num_train_timesteps
        fail(f"--num-steps must be at most the scheduler's {steps} training timesteps, got {num_steps}")
    # kept on the device, where ddim_step indexes them at every step (no host-device copy per step)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(device)
    kwargs = dict(revision=revision, torch_dtype=dtype)
    text_encoder = load_or_fail(CLIPTextModel.from_pretrained, model, subfolder="text_encoder", **kwargs)
    unet = load_or_fail(UNet2DConditionModel.from_pretrained, model, subfolder="unet", **kwargs)
    vae = load_or_fail(AutoencoderKL.from_pretrained, model, subfolder="vae", **kwargs)
    tokenizer = load_or_fail(CLIPTokenizer.from_pretrained, model, subfolder="tokenizer", revision=revision)
    if len(tokenizer) < 10:  # transformers returns an empty tokenizer, not an error, when the files are missing
        fail(f"'{model}' has no tokenizer files in its 'tokenizer' folder")
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False).eval().to(device)
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    if (
        device.type == "cpu"
        and sum(p.numel() for p in unet.parameters()) > 10**8
        and os.environ.get("RANK", "0") == "0"
    ):
        print(
            f"note: no CUDA device: '{model}' will be very slow on the CPU (try --preset tiny, the shipped tiny model)"
        )
    return StableDiffusion(tokenizer, text_encoder, unet, vae, scheduler)


def add_lora(unet: UNet2DConditionModel, rank: int = 4, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """LoRA (peft) on the attention projections; B starts at zero, so the model starts as the pretrained one.
    The trainable parameters are kept in fp32 whatever the frozen weights' dtype. Returns them."""
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def save_lora(unet: UNet2DConditionModel, directory: str) -> None:
    """Write `pytorch_lora_weights.safetensors` in diffusers' format, with the LoRA config (rank, alpha) in its
    metadata: `StableDiffusionPipeline.from_pretrained(base).load_lora_weights(directory)` loads it."""
    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    if not all(w.isfinite().all() for w in state_dict.values()):
        fail(f"the LoRA's weights are not finite, so they were not saved to {directory}: try a lower --learning-rate")
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=state_dict, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
    )


def load_lora(unet: UNet2DConditionModel, directory: str) -> None:
    """Load weights written by `save_lora` into a UNet that `add_lora` gave the same rank (to resume). A file that
    cannot be read or holds non-finite weights ends the program with one sentence."""
    try:
        state_dict = StableDiffusionPipeline.lora_state_dict(directory, weight_name=LORA_WEIGHTS)[0]
    except Exception as e:  # missing, truncated or not a safetensors file
        fail(f"the LoRA in '{directory}' cannot be read ({type(e).__name__}); resume from an earlier checkpoint")
    if not all(w.isfinite().all() for w in state_dict.values()):
        fail(f"the LoRA in '{directory}' holds non-finite weights; resume from an earlier checkpoint")
    state_dict = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
    try:
        result = set_peft_model_state_dict(unet, state_dict)
    except RuntimeError:  # a size mismatch: another rank
        fail(
            f"the LoRA in '{directory}' has other shapes than this UNet's LoRA: was it saved with another --lora-rank?"
        )
    if result.unexpected_keys:
        fail(f"the LoRA in '{directory}' does not fit this UNet (unexpected keys such as {result.unexpected_keys[0]})")


@torch.no_grad()
def encode_prompts(sd: StableDiffusion, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings, (B, 77, D), as StableDiffusionPipeline computes them (clip_skip None): the text
    encoder's last hidden state after its final layer norm. For SD 2.x (OpenCLIP-H, D = 1024) that is already
    OpenCLIP's penultimate layer: the converted encoder has its last layer dropped. For classifier-free
    guidance, encode [""] once and reuse it as the unconditional embedding."""
    ids = sd.tokenizer(
        prompts, padding="max_length", max_length=sd.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return sd.text_encoder(ids.to(sd.text_encoder.device))[0]
