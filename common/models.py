"""The text-to-image models, loaded from a diffusers pipeline (a hub id or a local folder), behind one interface that
the scripts use without naming a family: `encode` prompts into a Conditioning, `predict` the denoiser's output with
classifier-free guidance, the sampler's `schedule` on the model's Gaussian path, `decode` latents to images, and the
LoRA on the denoiser's attention projections (saved in diffusers' format: the pipeline's load_lora_weights reads it).
The family comes from the pipeline's model_index.json:
    StableDiffusionPipeline (SD 1.x, 2.x): CLIP text encoder, UNet predicting eps or v, DDIM on the VP path;
    StableDiffusionXLPipeline (SDXL): two CLIP text encoders, whose pooled embedding and the image size ("time ids")
        are added to the UNet's timestep embedding; eps, DDIM on the VP path."""

import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from common import fail, load_or_fail
from common.sampling import Schedule, randn

SD14 = "CompVis/stable-diffusion-v1-4"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name: load_lora_weights finds it
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
# each family's text encoders and tokenizers (subfolder, class), and the pipeline's LoRA loader
TEXT_ENCODERS = {
    "sd": [("text_encoder", CLIPTextModel, "tokenizer")],
    "sdxl": [
        ("text_encoder", CLIPTextModel, "tokenizer"),
        ("text_encoder_2", CLIPTextModelWithProjection, "tokenizer_2"),
    ],
}
LORA_LOADERS = {"sd": StableDiffusionLoraLoaderMixin, "sdxl": StableDiffusionXLLoraLoaderMixin}
# pipelines that are not text-to-image, and what to use instead
NOT_TEXT_TO_IMAGE = {
    "StableDiffusionXLImg2ImgPipeline": "an image-to-image pipeline (the SDXL refiner is one): use the SDXL base model",
    "StableDiffusionImg2ImgPipeline": "an image-to-image pipeline: use the text-to-image model it was made from",
    "StableDiffusionXLInpaintPipeline": "an inpainting pipeline: use the text-to-image model it was made from",
    "StableDiffusionInpaintPipeline": "an inpainting pipeline: use the text-to-image model it was made from",
}


@dataclass
class Conditioning:
    """What the denoiser reads besides the latents and the timestep, one row per sample: the text encoders' token
    embeddings (B, L, D); SDXL also a pooled text embedding (B, P) and the time ids (B, 6): the image's original size,
    crop corner and target size."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def map(self, fn) -> "Conditioning":
        """`fn` applied to each tensor it holds."""
        return Conditioning(*(None if x is None else fn(x) for x in (self.embeds, self.pooled, self.time_ids)))

    def __getitem__(self, index) -> "Conditioning":
        return self.map(lambda x: x[index])

    def __len__(self) -> int:
        return len(self.embeds)

    @staticmethod
    def cat(conds: list["Conditioning"]) -> "Conditioning":
        parts = [(c.embeds, c.pooled, c.time_ids) for c in conds]
        return Conditioning(*(None if x[0] is None else torch.cat(x) for x in zip(*parts)))


class Model:
    """A frozen text-to-image model in eval mode (load_model builds it): tokenizers, text encoders, the denoiser (the
    LoRA's host), the VAE and the scheduler config its schedules come from. Frozen weights in `dtype`; the sampler's
    arithmetic and the LoRA in fp32."""

    def __init__(self, family, tokenizers, text_encoders, denoiser, vae, scheduler, resolution: int, dtype,
                 zero_uncond: bool = False):  # fmt: skip
        self.family, self.tokenizers, self.text_encoders = family, tokenizers, text_encoders
        self.denoiser, self.vae, self.scheduler = denoiser, vae, scheduler
        self.resolution, self.dtype, self.device = resolution, dtype, denoiser.device
        self.prediction_type = scheduler.config.prediction_type
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD: 512 px <-> 64 x 64 latents
        self.schedules = {}
        # the unconditional conditioning of classifier-free guidance, computed once: the empty prompt's, or for SDXL
        # (force_zeros_for_empty_prompt) zeros in place of its text embeddings, as the pipeline does
        uncond = self.encode([""])
        self.uncond = Conditioning(uncond.embeds * 0, uncond.pooled * 0, uncond.time_ids) if zero_uncond else uncond

    # ---- prompts and the denoiser ----
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning, as the family's diffusers pipeline computes it (clip_skip None). SD: the text
        encoder's last hidden state after its final layer norm (for SD 2.x that is OpenCLIP's penultimate layer: the
        converted encoder has its last layer dropped). SDXL: both encoders' penultimate hidden states side by side
        (768 + 1280 = 2048 for SDXL base), the second encoder's projected pooled embedding, and the time ids of a
        square image at the model's resolution, uncropped."""
        hidden_states, pooled = [], None
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)  # fmt: skip
            if self.family == "sd":
                return Conditioning(text_encoder(ids)[0])
            output = text_encoder(ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # the projected text embedding (CLIPTextModelWithProjection's first output)
        embeds = torch.cat(hidden_states, dim=-1)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=self.device)
        return Conditioning(embeds, pooled, time_ids.expand(len(prompts), -1))

    def denoise(self, latents, t, cond: Conditioning) -> torch.Tensor:
        """One call of the denoiser on a batch, without guidance; its output in fp32."""
        cond = cond.map(lambda x: x.to(self.dtype))
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids} if self.family == "sdxl" else None
        output = self.denoiser(latents.to(self.dtype), t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added)
        return output.sample.float()

    def predict(self, latents, t, cond: Conditioning, guidance_scale: float, checkpointed=False, pretrained=False):
        """The guided output u + w (c - u) of one batched call on [unconditional; conditional] (a v or a velocity is
        affine in the eps it stands for, so guiding it guides that eps). As in diffusers, no guidance (one call on
        cond) when w <= 1. `t` is one timestep or one per sample (B,). `checkpointed` (with autograd on): keep only
        the inputs and recompute the call in the backward pass, to save memory. `pretrained`: the pretrained model's
        output, from the same denoiser with its LoRA switched off (inside the checkpointed call, so that the
        recomputation is the pretrained model's too)."""
        if checkpointed and torch.is_grad_enabled():
            return checkpoint(
                self.predict, latents, t, cond, guidance_scale, pretrained=pretrained, use_reentrant=False
            )
        if pretrained:
            self.denoiser.disable_adapters()
            try:
                return self.predict(latents, t, cond, guidance_scale)
            finally:
                self.denoiser.enable_adapters()
        if guidance_scale <= 1.0:
            return self.denoise(latents, t, cond)
        uncond = self.uncond.map(lambda x: x.expand(len(latents), *x.shape[1:]))
        t = torch.cat([t, t]) if t.ndim else t  # one timestep per sample (DDPO's shuffled steps) or one for all
        output_uncond, output_cond = self.denoise(torch.cat([latents, latents]), t, Conditioning.cat([uncond, cond])
                                                  ).chunk(2)  # fmt: skip
        return output_uncond + guidance_scale * (output_cond - output_uncond)

    # ---- the path and the latents ----
    def schedule(self, num_steps: int) -> Schedule:
        """The sampler's `num_steps` steps on the path (cached): DDIMScheduler's timesteps, alpha = sqrt(abar_t),
        sigma = sqrt(1 - abar_t), and after t_i the abar of t_i - 1000 / T, as DDIMScheduler.step takes it."""
        if num_steps not in self.schedules:
            self.scheduler.set_timesteps(num_steps)
            timesteps, abar = self.scheduler.timesteps, self.scheduler.alphas_cumprod
            prev = timesteps - self.scheduler.config.num_train_timesteps // num_steps
            abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], self.scheduler.final_alpha_cumprod)
            abars = torch.cat([abar[timesteps[:1]], abar_prev])  # abar at t_T, then after each step
            self.schedules[num_steps] = Schedule(
                timesteps.to(self.device), abars.sqrt().to(self.device), (1 - abars).sqrt().to(self.device),
                self.prediction_type,
            )  # fmt: skip
        return self.schedules[num_steps]

    def training_schedule(self) -> Schedule:
        """Every training timestep t = 0 ... 999 with its alpha and sigma, for a denoising loss (RWR)."""
        abar = self.scheduler.alphas_cumprod.to(self.device)
        abars = torch.cat([abar, abar.new_ones(1)])
        timesteps = torch.arange(len(abar), device=self.device)
        return Schedule(timesteps, abars.sqrt(), (1 - abars).sqrt(), self.prediction_type)

    def initial_latents(self, batch_size: int, generator=None) -> torch.Tensor:
        """x_T ~ N(0, I) at the model's resolution, (B, C, resolution / f, resolution / f)."""
        size = self.resolution // self.vae_scale_factor
        return randn((batch_size, self.denoiser.config.in_channels, size, size), generator, self.device)

    def decode(self, latents, checkpointed: bool = False) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], differentiable; optionally checkpointed (the VAE decoder's
        activations at 512 px are large)."""

        def vae_decode(z):
            return self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()

        if checkpointed and torch.is_grad_enabled():
            images = checkpoint(vae_decode, latents, use_reentrant=False)
        else:
            images = vae_decode(latents)
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the VAE posterior's mean in latent units (what decode inverts)."""
        latents = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mean.float()
        return latents * self.vae.config.scaling_factor

    # ---- LoRA ----
    def add_lora(self, rank: int = 4, alpha: float | None = None) -> list[torch.nn.Parameter]:
        """LoRA (peft) on the denoiser's attention projections; B starts at zero, so the model starts as the
        pretrained one. The trainable parameters are kept in fp32 whatever the frozen weights' dtype. Returns them."""
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
        self.denoiser.add_adapter(config)
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        return params

    def save_lora(self, directory: str) -> None:
        """Write `pytorch_lora_weights.safetensors` in diffusers' format, with the LoRA config (rank, alpha) in its
        metadata: the family's pipeline `.from_pretrained(base).load_lora_weights(directory)` loads it."""
        state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
        if not all(w.isfinite().all() for w in state_dict.values()):
            fail(
                f"the LoRA's weights are not finite, so they were not saved to {directory}: try a lower --learning-rate"
            )
        self.pipeline_class.save_lora_weights(
            directory,
            unet_lora_layers=state_dict,
            unet_lora_adapter_metadata=self.denoiser.peft_config["default"].to_dict(),
        )

    def load_lora(self, directory: str) -> None:
        """Load weights written by `save_lora` into a LoRA that `add_lora` gave the same rank (to resume). A file that
        cannot be read or holds non-finite weights ends the program with one sentence."""
        try:
            state_dict = self.pipeline_class.lora_state_dict(directory, weight_name=LORA_WEIGHTS)[0]
        except Exception as e:  # missing, truncated or not a safetensors file
            fail(f"the LoRA in '{directory}' cannot be read ({type(e).__name__}); resume from an earlier checkpoint")
        if not all(w.isfinite().all() for w in state_dict.values()):
            fail(f"the LoRA in '{directory}' holds non-finite weights; resume from an earlier checkpoint")
        state_dict = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
        try:
            result = set_peft_model_state_dict(self.denoiser, state_dict)
        except RuntimeError:  # a size mismatch: another rank
            fail(f"the LoRA in '{directory}' has other shapes than this model's LoRA: was it saved with another"
                 " --lora-rank?")  # fmt: skip
        if result.unexpected_keys:
            fail(f"the LoRA in '{directory}' does not fit this model (unexpected keys such as"
                 f" {result.unexpected_keys[0]})")  # fmt: skip

    @property
    def pipeline_class(self):  # the pipeline's LoRA loader: its save_lora_weights and lora_state_dict
        return LORA_LOADERS[self.family]


def load_model(name: str = SD14, revision=None, device="cpu", dtype=None, resolution: int = 512, num_steps: int = 1):
    """The model of a hub id or local pipeline folder, frozen, in eval mode, attention through PyTorch's
    scaled_dot_product_attention. Frozen weights in bf16 on CUDA and fp32 elsewhere unless `dtype` is given.
    `resolution` (images are square) and `num_steps`, the sampling steps the caller will take, are checked against
    the model. Anything that cannot be loaded or used ends the program with one sentence."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # model_index.json is the smallest file: a wrong id or no network fails here, before any download
    index = load_or_fail(DiffusionPipeline.load_config, name, revision=revision)
    kind = index.get("_class_name")
    if kind in NOT_TEXT_TO_IMAGE:
        fail(f"'{name}' is {NOT_TEXT_TO_IMAGE[kind]}")
    if kind not in FAMILIES:
        fail(f"'{name}' is a {kind}; these scripts take a text-to-image pipeline of one of: {', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    scheduler_config = load_or_fail(DDIMScheduler.load_config, name, subfolder="scheduler", revision=revision)
    # SD never clips x0_hat (StableDiffusionPipeline turns clip_sample off too); the DDIM step has no clipping
    # SDXL ships an Euler config without set_alpha_to_one, which DDIMScheduler would default to True (a last step
    # into abar = 1, without noise): it is trained on SD's betas, so its DDIM ends as SD 1.x's config says, at
    # alphas_cumprod[0], and every step keeps its noise
    alpha_to_one = scheduler_config.get("set_alpha_to_one", False)
    scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False, set_alpha_to_one=alpha_to_one)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        fail(f"'{name}' predicts '{scheduler.config.prediction_type}'; these scripts need a model that predicts "
             "'epsilon' (SD 1.x, SD 2.x base) or 'v_prediction' (SD 2.x at 768 px)")  # fmt: skip
    if num_steps > scheduler.config.num_train_timesteps:
        steps = scheduler.config.num_train_timesteps
        fail(f"--num-steps must be at most the scheduler's {steps} training timesteps, got {num_steps}")
    kwargs = dict(revision=revision, torch_dtype=dtype)
    text_encoders, tokenizers = [], []
    for encoder_folder, encoder_class, tokenizer_folder in TEXT_ENCODERS[family]:
        text_encoders.append(load_or_fail(encoder_class.from_pretrained, name, subfolder=encoder_folder, **kwargs))
        tokenizer = load_or_fail(CLIPTokenizer.from_pretrained, name, subfolder=tokenizer_folder, revision=revision)
        if len(tokenizer) < 10:  # transformers returns an empty tokenizer, not an error, when the files are missing
            fail(f"'{name}' has no tokenizer files in its '{tokenizer_folder}' folder")
        tokenizers.append(tokenizer)
    unet = load_or_fail(UNet2DConditionModel.from_pretrained, name, subfolder="unet", **kwargs)
    vae = load_or_fail(AutoencoderKL.from_pretrained, name, subfolder="vae", **kwargs)
    if unet.config.in_channels != vae.config.latent_channels:
        channels = (unet.config.in_channels, vae.config.latent_channels)
        fail(f"'{name}' has a UNet of {channels[0]} input channels for latents of {channels[1]}: an inpainting or other"
             " image-conditioned model, not text-to-image")  # fmt: skip
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor or resolution < factor:
        fail(f"--resolution must be a positive multiple of {factor} (the VAE's downsampling), got {resolution}")
    for module in (*text_encoders, unet, vae):
        module.requires_grad_(False).eval().to(device)
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    if (
        device.type == "cpu"
        and sum(p.numel() for p in unet.parameters()) > 10**8
        and os.environ.get("RANK", "0") == "0"
    ):
        print(
            f"note: no CUDA device: '{name}' will be very slow on the CPU (try --preset tiny, the shipped tiny model)"
        )
    zero_uncond = family == "sdxl" and index.get("force_zeros_for_empty_prompt", True)
    return Model(family, tokenizers, text_encoders, unet, vae, scheduler, resolution, dtype, zero_uncond)
