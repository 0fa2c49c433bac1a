"""The text-to-image models, loaded from a diffusers pipeline (a hub id or a local folder), behind one interface that
the scripts use without naming a family: `encode` prompts into a Conditioning, `predict` the denoiser's output with
classifier-free guidance, the sampler's `schedule` on the model's Gaussian path, `decode` latents to images, and the
LoRA on the denoiser's attention projections (saved in diffusers' format: the pipeline's load_lora_weights reads it).
The family comes from the pipeline's model_index.json:
    StableDiffusionPipeline (SD 1.x, 2.x): CLIP text encoder, UNet predicting eps or v, DDIM on the VP path;
    StableDiffusionXLPipeline (SDXL): two CLIP text encoders, whose pooled embedding and the image size ("time ids")
        are added to the UNet's timestep embedding; eps, DDIM on the VP path;
    StableDiffusion3Pipeline (SD 3, 3.5): two CLIP encoders and T5 (optional), an MMDiT transformer predicting the
        velocity eps - x0 of a rectified flow (alpha = 1 - sigma), the flow scheduler's sigmas (shift included)."""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from common import fail, load_or_fail
from common.sampling import Schedule, randn

SD14 = "CompVis/stable-diffusion-v1-4"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name: load_lora_weights finds it
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
# each family's text encoders and tokenizers (subfolders, classes), and the pipeline's LoRA loader
CLIP_L, CLIP_G = ("text_encoder", "tokenizer", CLIPTextModelWithProjection), ("text_encoder_2", "tokenizer_2",
                                                                               CLIPTextModelWithProjection)  # fmt: skip
TEXT_ENCODERS = {
    "sd": [("text_encoder", "tokenizer", CLIPTextModel)],
    "sdxl": [("text_encoder", "tokenizer", CLIPTextModel), CLIP_G],
    "sd3": [CLIP_L, CLIP_G, ("text_encoder_3", "tokenizer_3", T5EncoderModel)],
}
LORA_LOADERS = {
    "sd": StableDiffusionLoraLoaderMixin,
    "sdxl": StableDiffusionXLLoraLoaderMixin,
    "sd3": SD3LoraLoaderMixin,
}
# the attention projections the LoRA adapts: the UNet's, or the MMDiT's image and text streams (as diffusers' SD 3
# LoRA example)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TARGETS_MMDIT = LORA_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
# pipelines that are not text-to-image, and what to use instead
NOT_TEXT_TO_IMAGE = {
    "StableDiffusionXLImg2ImgPipeline": "an image-to-image pipeline (the SDXL refiner is one): use the SDXL base model",
    "StableDiffusionImg2ImgPipeline": "an image-to-image pipeline: use the text-to-image model it was made from",
    "StableDiffusionXLInpaintPipeline": "an inpainting pipeline: use the text-to-image model it was made from",
    "StableDiffusionInpaintPipeline": "an inpainting pipeline: use the text-to-image model it was made from",
    "FluxPipeline": (
        "a FLUX.1 pipeline, which these scripts do not load yet: its flow step is SD 3's, but it is"
        " guidance-distilled (a guidance input, no classifier-free guidance) and packs its latents"
    ),
}


@dataclass
class Conditioning:
    """What the denoiser reads besides the latents and the timestep, one row per sample: the text encoders' token
    embeddings (B, L, D); SDXL and SD 3 also a pooled text embedding (B, P); SDXL the time ids (B, 6): the image's
    original size, crop corner and target size."""

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
    def token_ids(self, i: int, prompts: list[str]) -> torch.Tensor:
        """The prompts as the i-th tokenizer pads and truncates them: CLIP's 77 tokens, T5's 256 (SD 3's pipeline)."""
        tokenizer = self.tokenizers[i]
        length = T5_TOKENS if isinstance(tokenizer, T5TokenizerFast) else tokenizer.model_max_length
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)  # fmt: skip

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning, as the family's diffusers pipeline computes it (clip_skip None). SD: the text
        encoder's last hidden state after its final layer norm (for SD 2.x that is OpenCLIP's penultimate layer: the
        converted encoder has its last layer dropped). SDXL and SD 3: the two CLIP encoders' penultimate states side by
        side (768 + 1280 = 2048); SDXL adds the second encoder's projected pooled embedding and the time ids of a
        square image at the model's resolution, uncropped; SD 3 pads the CLIP states to T5's width and appends T5's
        256 token states (zeros without T5), and pools both CLIP encoders' projections (2048)."""
        if self.family == "sd":
            return Conditioning(self.text_encoders[0](self.token_ids(0, prompts))[0])
        states, pooled = [], []
        for i in range(2):
            output = self.text_encoders[i](self.token_ids(i, prompts), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled.append(output[0])  # the projected text embedding (CLIPTextModelWithProjection's first output)
        embeds = torch.cat(states, dim=-1)
        if self.family == "sdxl":
            size = self.resolution
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=self.device)
            return Conditioning(embeds, pooled[1], time_ids.expand(len(prompts), -1))
        width = self.denoiser.config.joint_attention_dim
        if len(self.text_encoders) == 3:
            t5 = self.text_encoders[2](self.token_ids(2, prompts))[0]
        else:  # StableDiffusion3Pipeline with text_encoder_3=None
            t5 = embeds.new_zeros(len(prompts), T5_TOKENS, width)
        embeds = torch.cat([F.pad(embeds, (0, width - embeds.shape[-1])), t5], dim=1)  # (B, 77 + 256, width)
        return Conditioning(embeds, torch.cat(pooled, dim=-1))

    def denoise(self, latents, t, cond: Conditioning) -> torch.Tensor:
        """One call of the denoiser on a batch, without guidance; its output in fp32."""
        latents, cond = latents.to(self.dtype), cond.map(lambda x: x.to(self.dtype))
        if self.family == "sd3":
            t = t.expand(len(latents)) if t.ndim == 0 else t
            return self.denoiser(hidden_states=latents, timestep=t, encoder_hidden_states=cond.embeds,
                                 pooled_projections=cond.pooled).sample.float()  # fmt: skip
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids} if self.family == "sdxl" else None
        return self.denoiser(latents, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample.float()

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
        """The sampler's `num_steps` steps on the path (cached). VP (SD, SDXL): DDIMScheduler's timesteps, alpha =
        sqrt(abar_t), sigma = sqrt(1 - abar_t), and after t_i the abar of t_i - 1000 / T, as DDIMScheduler.step takes
        it. Flow (SD 3): FlowMatchEulerDiscreteScheduler's sigmas, its shift included, ending at 0; alpha = 1 - sigma;
        the transformer is called with 1000 sigma."""
        if num_steps not in self.schedules:
            if self.prediction_type == "flow":
                self.scheduler.set_timesteps(num_steps, **self.shift_kwargs())
                timesteps, sigmas = self.scheduler.timesteps, self.scheduler.sigmas.float()
                alphas = 1 - sigmas
            else:
                self.scheduler.set_timesteps(num_steps)
                timesteps, abar = self.scheduler.timesteps, self.scheduler.alphas_cumprod
                prev = timesteps - self.scheduler.config.num_train_timesteps // num_steps
                abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], self.scheduler.final_alpha_cumprod)
                abars = torch.cat([abar[timesteps[:1]], abar_prev])  # abar at t_T, then after each step
                alphas, sigmas = abars.sqrt(), (1 - abars).sqrt()
            if self.prediction_type == "epsilon" and alphas[0] == 0:  # x0_hat = (x - sigma eps) / alpha: undefined
                fail("the scheduler's first step starts from pure noise (a zero-terminal-SNR schedule, e.g."
                     " rescale_betas_zero_snr with 'trailing' spacing), where an epsilon model's x0 is undefined: use a"
                     " v-prediction model with such a schedule, or 'leading' spacing")  # fmt: skip
            floor = sigmas[-2].item() if self.prediction_type == "flow" else 0.0  # sigma_min: Schedule.step_std
            self.schedules[num_steps] = Schedule(timesteps.to(self.device), alphas.to(self.device),
                                                 sigmas.to(self.device), self.prediction_type, floor)  # fmt: skip
        return self.schedules[num_steps]

    def shift_kwargs(self) -> dict:
        """A flow scheduler with resolution-dependent shifting needs mu, from the image's token count (as the
        pipelines compute it); SD 3 and 3.5 use a fixed shift instead."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        tokens = (self.resolution // self.vae_scale_factor // self.denoiser.config.patch_size) ** 2
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        return {"mu": config.base_shift + slope * (tokens - config.base_image_seq_len)}

    def training_schedule(self) -> Schedule:
        """Every training timestep with its alpha and sigma, for a denoising loss (RWR): SD's t = 0 ... 999, or the
        flow scheduler's 1000 (shifted) training sigmas."""
        if self.prediction_type == "flow":
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)  # its training sigmas
            sigmas = torch.cat([scheduler.sigmas.float(), torch.zeros(1)]).to(self.device)
            return Schedule(scheduler.timesteps.to(self.device), 1 - sigmas, sigmas, "flow")
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

        config = self.vae.config

        def vae_decode(z):  # SD 3's VAE also shifts its latents: z = (latents - shift) * scale
            return self.vae.decode(
                z.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0)
            ).sample.float()

        if checkpointed and torch.is_grad_enabled():
            images = checkpoint(vae_decode, latents, use_reentrant=False)
        else:
            images = vae_decode(latents)
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the VAE posterior's mean in latent units (what decode inverts)."""
        latents = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mean.float()
        return (latents - (self.vae.config.shift_factor or 0)) * self.vae.config.scaling_factor

    # ---- LoRA ----
    def add_lora(self, rank: int = 4, alpha: float | None = None) -> list[torch.nn.Parameter]:
        """LoRA (peft) on the denoiser's attention projections; B starts at zero, so the model starts as the
        pretrained one. The trainable parameters are kept in fp32 whatever the frozen weights' dtype. Returns them."""
        targets = LORA_TARGETS_MMDIT if self.family == "sd3" else LORA_TARGETS
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
        self.denoiser.add_adapter(config)
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        return params

    def save_lora(self, directory: str) -> None:
        """Write `pytorch_lora_weights.safetensors` in diffusers' format, with the LoRA config (rank, alpha) in its
        metadata: the family's pipeline `.from_pretrained(base).load_lora_weights(directory)` loads it."""
        state_dict = get_peft_model_state_dict(self.denoiser)
        if not all(w.isfinite().all() for w in state_dict.values()):
            fail(
                f"the LoRA's weights are not finite, so they were not saved to {directory}: try a lower --learning-rate"
            )
        name = "transformer" if self.family == "sd3" else "unet"  # the keys' prefix in the file
        if name == "unet":  # the UNet pipelines' own (older) key names, as diffusers' SD and SDXL LoRA examples save
            state_dict = convert_state_dict_to_diffusers(state_dict)
        config = self.denoiser.peft_config["default"].to_dict()
        self.pipeline_class.save_lora_weights(directory, **{f"{name}_lora_layers": state_dict,
                                                            f"{name}_lora_adapter_metadata": config})  # fmt: skip

    def load_lora(self, directory: str) -> None:
        """Load weights written by `save_lora` into a LoRA that `add_lora` gave the same rank (to resume). A file that
        cannot be read or holds non-finite weights ends the program with one sentence."""
        try:
            loader = self.pipeline_class.lora_state_dict
            state_dict = loader(directory, weight_name=LORA_WEIGHTS, return_lora_metadata=True)[0]
        except Exception as e:  # missing, truncated or not a safetensors file
            fail(f"the LoRA in '{directory}' cannot be read ({type(e).__name__}); resume from an earlier checkpoint")
        if not all(w.isfinite().all() for w in state_dict.values()):
            fail(f"the LoRA in '{directory}' holds non-finite weights; resume from an earlier checkpoint")
        prefix = "transformer." if self.family == "sd3" else "unet."
        state_dict = convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in state_dict.items()})
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


def load_model(name: str = SD14, revision=None, device="cpu", dtype=None, resolution: int = 512, num_steps: int = 1,
               t5: bool = True) -> Model:  # fmt: skip
    """The model of a hub id or local pipeline folder, frozen, in eval mode, attention through PyTorch's
    scaled_dot_product_attention. Frozen weights in bf16 on CUDA and fp32 elsewhere unless `dtype` is given.
    `resolution` (images are square) and `num_steps`, the sampling steps the caller will take, are checked against
    the model; `t5=False` leaves an SD 3 pipeline's T5 encoder unloaded (as text_encoder_3=None: ~9 GB less at SD 3.5
    scale). Anything that cannot be loaded or used ends the program with one sentence."""
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
    try:
        if family == "sd3":
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
            scheduler.register_to_config(prediction_type="flow")  # the velocity eps - x0 (the config names none)
        else:
            # SD never clips x0_hat (StableDiffusionPipeline turns clip_sample off too); the DDIM step has no
            # clipping. SDXL ships an Euler config without set_alpha_to_one, which DDIMScheduler would default to True
            # (a last step into abar = 1, without noise): it is trained on SD's betas, so its DDIM ends as SD 1.x's
            # config says, at alphas_cumprod[0], and every step keeps its noise
            alpha_to_one = scheduler_config.get("set_alpha_to_one", False)
            scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False, set_alpha_to_one=alpha_to_one)
    except (NotImplementedError, ValueError, TypeError) as e:  # e.g. a beta_schedule diffusers does not know
        fail(f"'{name}' has a scheduler config these scripts cannot use ({str(e).splitlines()[0][:200]})")
    if family != "sd3" and scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        fail(f"'{name}' predicts '{scheduler.config.prediction_type}'; these scripts need a model that predicts "
             "'epsilon' (SD 1.x, SD 2.x base, SDXL) or 'v_prediction' (SD 2.x at 768 px)")  # fmt: skip
    if num_steps > scheduler.config.num_train_timesteps:
        steps = scheduler.config.num_train_timesteps
        fail(f"--num-steps must be at most the scheduler's {steps} training timesteps, got {num_steps}")
    kwargs = dict(revision=revision, torch_dtype=dtype)
    text_encoders, tokenizers = [], []
    for encoder_folder, tokenizer_folder, encoder_class in TEXT_ENCODERS[family]:
        if encoder_folder == "text_encoder_3" and not (t5 and (index.get(encoder_folder) or [None])[0]):
            continue  # SD 3 without T5: the pipeline's text_encoder_3=None (or a folder saved without it)
        text_encoders.append(load_or_fail(encoder_class.from_pretrained, name, subfolder=encoder_folder, **kwargs))
        tokenizer_class = T5TokenizerFast if encoder_class is T5EncoderModel else CLIPTokenizer
        tokenizer = load_or_fail(tokenizer_class.from_pretrained, name, subfolder=tokenizer_folder, revision=revision)
        if len(tokenizer) < 10:  # transformers returns an empty tokenizer, not an error, when the files are missing
            fail(f"'{name}' has no tokenizer files in its '{tokenizer_folder}' folder")
        tokenizers.append(tokenizer)
    denoiser_class, denoiser_folder = (SD3Transformer2DModel, "transformer") if family == "sd3" else (
        UNet2DConditionModel, "unet")  # fmt: skip
    denoiser = load_or_fail(denoiser_class.from_pretrained, name, subfolder=denoiser_folder, **kwargs)
    vae = load_or_fail(AutoencoderKL.from_pretrained, name, subfolder="vae", **kwargs)
    if denoiser.config.in_channels != vae.config.latent_channels:
        channels = (denoiser.config.in_channels, vae.config.latent_channels)
        fail(f"'{name}' has a denoiser of {channels[0]} input channels for latents of {channels[1]}: an inpainting or"
             " other image-conditioned model, not text-to-image")  # fmt: skip
    factor = 2 ** (len(vae.config.block_out_channels) - 1) * denoiser.config.get("patch_size", 1)
    if resolution % factor or resolution < factor:
        why = "the VAE's downsampling" + (" times the transformer's patch size" if family == "sd3" else "")
        fail(f"--resolution must be a positive multiple of {factor} ({why}), got {resolution}")
    patches = denoiser.config.get("pos_embed_max_size") or math.inf  # the MMDiT's positional embedding, a side
    if resolution > factor * patches:
        fail(f"--resolution must be at most {factor * patches} for this transformer (its positional embedding covers"
             f" {patches} patches a side), got {resolution}")  # fmt: skip
    for module in (*text_encoders, denoiser, vae):
        module.requires_grad_(False).eval().to(device)
    if family != "sd3":  # the MMDiT's joint attention uses scaled_dot_product_attention already
        denoiser.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    large = sum(p.numel() for p in denoiser.parameters()) > 10**8
    if device.type == "cpu" and large and os.environ.get("RANK", "0") == "0":
        print(
            f"note: no CUDA device: '{name}' will be very slow on the CPU (try --preset tiny, the shipped tiny model)"
        )
    zero_uncond = family == "sdxl" and index.get("force_zeros_for_empty_prompt", True)
    model = Model(family, tokenizers, text_encoders, denoiser, vae, scheduler, resolution, dtype, zero_uncond)
    model.schedule(num_steps)  # the sampler's schedule, checked now (and cached)
    return model
