"""The text-to-image model behind one interface, whatever its family: `encode` prompts into a Conditioning, `predict`
the denoiser's guided output, the sampler's `schedule` on the model's Gaussian path, `decode` latents to images, and
the LoRA on the denoiser (saved in diffusers' format, which the pipeline's load_lora_weights reads).

What differs between diffusers' pipelines (prompt encoding, the denoiser's call, the latents' layout and the VAE's
normalisation, the flow's shift, the LoRA's modules) lives in one module per family, `common/families/`, each a
subclass of `Model`; `load_model` reads the family from the pipeline's model_index.json. Latents are (B, C, h, w)
for every family: a family whose transformer reads packed patches packs them inside its own call."""

import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.utils.checkpoint import checkpoint

from common import hooks
from common.cli import fail, load_or_fail
from common.flags import SD14
from common.lora import Lora
from common.sampling import Schedule, randn

# the attention projections a LoRA adapts in every family: the image stream's (a UNet's only ones)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Conditioning:
    """What the denoiser reads besides the latents and the timestep, one row per sample: the text encoder's token
    states `embeds` (B, L, D); for some families a pooled text embedding (B, P), the image's size ("time ids", SDXL,
    (B, 6)), or a mask (B, L) of the tokens that are real where prompts of different lengths are padded (Qwen-Image)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def map(self, fn) -> "Conditioning":
        """`fn` applied to each tensor it holds."""
        return Conditioning(*(None if x is None else fn(x) for x in self.tensors()))

    def tensors(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    def __getitem__(self, index) -> "Conditioning":
        return self.map(lambda x: x[index])

    def __len__(self) -> int:
        return len(self.embeds)

    @staticmethod
    def cat(conds: list["Conditioning"]) -> "Conditioning":
        """The rows of several Conditionings in one. Token states of different lengths (masked ones) are padded at
        the end with zeros that their mask leaves out."""
        length = max(c.embeds.shape[1] for c in conds)
        if any(c.embeds.shape[1] != length and c.mask is None for c in conds):
            raise ValueError("only conditionings with a token mask can have different lengths")
        padded = [c if c.embeds.shape[1] == length else c.padded(length) for c in conds]
        return Conditioning(*(None if x[0] is None else torch.cat(x) for x in zip(*(c.tensors() for c in padded))))

    def padded(self, length: int) -> "Conditioning":
        extra = length - self.embeds.shape[1]
        embeds = torch.cat([self.embeds, self.embeds.new_zeros(len(self), extra, self.embeds.shape[2])], dim=1)
        mask = torch.cat([self.mask, self.mask.new_zeros(len(self), extra)], dim=1)
        return Conditioning(embeds, self.pooled, self.time_ids, mask)


class Model(Lora):
    """A frozen text-to-image model in eval mode (`load_model` builds it): tokenizers, text encoders, the denoiser (the
    LoRA's host), the VAE and the scheduler config its schedules come from. Frozen weights in `dtype`; the sampler's
    arithmetic and the LoRA in fp32. A family (common/families) sets the class attributes below and implements
    `encode_prompt` and `denoise`; the other methods are the same for every family unless one overrides them."""

    family: str  # a short name, "sd", "sdxl", ...
    pipeline: str  # the diffusers pipeline's class name, which a model card names
    lora_loader: type  # the pipeline's LoRA loader mixin: its save_lora_weights and lora_state_dict
    hub_tag: str  # the Hub's tag for models of the family
    # (encoder subfolder, tokenizer subfolder, encoder class, tokenizer class) of each text encoder, in order
    text_encoder_classes: list[tuple[str, str, type, type]]
    denoiser_class: type  # loaded from the subfolder `denoiser_folder`
    denoiser_folder: str = "transformer"
    vae_class: type = AutoencoderKL
    flow: bool = True  # a rectified flow (FlowMatchEulerDiscreteScheduler), else SD's VP path (DDIM)
    packed: bool = False  # the transformer reads 2 x 2 patches of the latents as tokens, packed outside it
    lora_targets: list[str] = LORA_TARGETS
    lora_prefix: str = "transformer"  # the keys' prefix in the LoRA file, as the pipeline's loader expects
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance

    def __init__(self, index, tokenizers, text_encoders, denoiser, vae, scheduler, resolution: int, dtype):
        self.index, self.tokenizers, self.text_encoders = index, tokenizers, text_encoders
        self.denoiser, self.vae, self.scheduler = denoiser, vae, scheduler
        self.resolution, self.dtype, self.device = resolution, dtype, denoiser.device
        self.prediction_type = scheduler.config.prediction_type
        self.schedules, self.cache = {}, None
        self.uncond = self.unconditional()  # computed once

    # ---- prompts and the denoiser: what each family does its own way ----
    @classmethod
    def text_encoders_to_load(cls, index: dict, t5: bool) -> list:
        """The text encoders a run loads: all of them, unless the family can leave T5 out (`t5` False)."""
        return cls.text_encoder_classes

    def token_ids(self, i: int, prompts: list[str], length: int | None = None) -> torch.Tensor:
        """The prompts as the i-th tokenizer pads and truncates them: to `length`, or its own maximum (CLIP's 77)."""
        tokenizer = self.tokenizers[i]
        length = length or tokenizer.model_max_length
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return tokens.input_ids.to(self.device)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning, as the family's pipeline computes it (its `encode_prompt`)."""
        raise NotImplementedError

    def denoise(self, latents, t, cond: Conditioning) -> torch.Tensor:
        """One call of the denoiser on a batch (B, C, h, w), without guidance; its output in fp32, (B, C, h, w)."""
        raise NotImplementedError

    def unconditional(self) -> Conditioning | None:
        """The unconditional conditioning of classifier-free guidance: the negative prompt's, in a batch of one."""
        return self.encode([self.negative_prompt])

    def guide(self, latents, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance: u + w (c - u) from one batched call on [unconditional; conditional] (a v or a
        velocity is affine in the eps it stands for, so guiding it guides that eps). As in diffusers, no guidance
        (one call on cond) when w <= 1."""
        if guidance_scale <= 1.0:
            return self.denoise(latents, t, cond)
        uncond = self.uncond.map(lambda x: x.expand(len(latents), *x.shape[1:]))
        t = torch.cat([t, t]) if t.ndim else t  # one timestep per sample (DDPO's shuffled steps) or one for all
        both = self.denoise(torch.cat([latents, latents]), t, Conditioning.cat([uncond, cond]))
        output_uncond, output_cond = both.chunk(2)
        return output_uncond + guidance_scale * (output_cond - output_uncond)

    def training_guidance(self, guidance_scale: float) -> float:
        """The guidance of the prediction that a denoising loss regresses (RWR): 1, the conditional model without
        guidance, as the model was trained; a guidance-distilled family returns the guidance input it samples with."""
        return 1.0

    # ---- the interface the scripts use ----
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning: from the text encoders, or after `free_text_encoders` from its cache."""
        if self.cache is None:
            return self.encode_prompt(prompts)
        missing = [p for p in prompts if p not in self.cache]
        if missing:
            fail(f"the prompt {missing[0]!r} was not encoded before the text encoders were freed")
        return Conditioning.cat([self.cache[p] for p in prompts]).map(lambda x: x.to(self.device))

    def free_text_encoders(self, prompts: list[str]) -> None:
        """Encode `prompts` once (one at a time, so each row is what any batch would give), keep their conditionings
        on the CPU, and free the text encoders: their memory (T5-XXL's 9.5 GB, Qwen2.5-VL's 16.6 GB in bf16) goes to
        training. Afterwards `encode` takes only these prompts."""
        self.cache = {p: self.encode_prompt([p]).map(lambda x: x.cpu()) for p in dict.fromkeys(prompts)}
        self.text_encoders.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def predict(self, latents, t, cond: Conditioning, guidance_scale: float, checkpointed=False, pretrained=False):
        """The guided output of the denoiser (`guide`) at x_t = `latents`. `t` is one timestep or one per sample (B,).
        `checkpointed` (with autograd on): keep only the inputs and recompute the call in the backward pass, to save
        memory. `pretrained`: the pretrained model's output, from the same denoiser with its LoRA switched off (inside
        the checkpointed call, so that the recomputation is the pretrained model's too)."""
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
        return self.guide(latents, t, cond, guidance_scale)

    # ---- the path and the latents ----
    def schedule(self, num_steps: int) -> Schedule:
        """The sampler's `num_steps` steps on the path (cached). VP (SD, SDXL): DDIMScheduler's timesteps, alpha =
        sqrt(abar_t), sigma = sqrt(1 - abar_t), and after t_i the abar of t_i - 1000 / T, as DDIMScheduler.step takes
        it. Flow: the flow scheduler's sigmas as the family's pipeline sets them (`flow_timesteps`), ending at 0;
        alpha = 1 - sigma; the denoiser is called with 1000 sigma (a family may rescale it in its call)."""
        if num_steps not in self.schedules:
            if self.flow:
                with np.errstate(invalid="ignore", divide="ignore"):  # non-finite sigmas are refused below
                    self.scheduler.set_timesteps(**self.flow_timesteps(num_steps))
                timesteps, sigmas = self.scheduler.timesteps, self.scheduler.sigmas.float()
                alphas = 1 - sigmas
            else:
                self.scheduler.set_timesteps(num_steps)
                timesteps, abar = self.scheduler.timesteps, self.scheduler.alphas_cumprod
                prev = timesteps - self.scheduler.config.num_train_timesteps // num_steps
                abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], self.scheduler.final_alpha_cumprod)
                abars = torch.cat([abar[timesteps[:1]], abar_prev])  # abar at t_T, then after each step
                alphas, sigmas = abars.sqrt(), (1 - abars).sqrt()
            if not sigmas.isfinite().all():  # Qwen-Image's stretch to its terminal sigma divides by 0 at one step
                fail(f"--num-steps {num_steps} gives this model's scheduler sigmas that are not finite: raise it")
            if self.prediction_type == "epsilon" and alphas[0] == 0:  # x0_hat = (x - sigma eps) / alpha: undefined
                fail(
                    "the scheduler's first step starts from pure noise (a zero-terminal-SNR schedule, e.g."
                    " rescale_betas_zero_snr with 'trailing' spacing), where an epsilon model's x0 is undefined: use"
                    " a v-prediction model with such a schedule, or 'leading' spacing"
                )
            floor = sigmas[-2].item() if self.flow else 0.0  # a flow's smallest sigma: Schedule.step_std says why
            schedule = Schedule(timesteps, alphas, sigmas, self.prediction_type, floor)
            self.schedules[num_steps] = schedule.to(self.device)
        return self.schedules[num_steps]

    def flow_timesteps(self, num_steps: int) -> dict:
        """The flow scheduler's set_timesteps arguments, as the family's pipeline passes them."""
        return {"num_inference_steps": num_steps}

    def dynamic_shift(self) -> dict:
        """A flow scheduler with resolution-dependent shifting needs mu, from the image's token count: linear in it
        between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the pipelines compute it.
        The sigmas are then shifted as exp(mu) / (exp(mu) + 1 / sigma - 1)."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        tokens = (self.resolution // self.latent_multiple()) ** 2
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        slope = (config.get("max_shift", 1.15) - config.get("base_shift", 0.5)) / (top - base)
        return {"mu": config.get("base_shift", 0.5) + slope * (tokens - base)}

    def training_schedule(self) -> Schedule:
        """Every training timestep with its alpha and sigma, for a denoising loss (RWR): SD's t = 0 ... 999, or the
        flow scheduler's 1000 training sigmas (shifted by its fixed shift; not shifted where the shift is dynamic)."""
        if self.flow:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)  # its training sigmas
            sigmas = torch.cat([scheduler.sigmas.float(), torch.zeros(1)])
            return Schedule(scheduler.timesteps, 1 - sigmas, sigmas, "flow").to(self.device)
        abar = self.scheduler.alphas_cumprod
        abars = torch.cat([abar, abar.new_ones(1)])
        timesteps = torch.arange(len(abar))
        return Schedule(timesteps, abars.sqrt(), (1 - abars).sqrt(), self.prediction_type).to(self.device)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent a side: 8 for SD's VAE (512 px <-> 64 x 64 latents)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def latent_multiple(self) -> int:
        """Pixels per token a side: the VAE's factor, times the 2 x 2 patch a transformer makes one token of."""
        return self.vae_scale_factor * (2 if self.packed else self.denoiser.config.get("patch_size", 1))

    def initial_latents(self, batch_size: int, generator=None) -> torch.Tensor:
        """x_T ~ N(0, I) at the model's resolution, (B, C, resolution / f, resolution / f)."""
        size = self.resolution // self.vae_scale_factor
        return randn((batch_size, self.latent_channels, size, size), generator, self.device)

    def vae_decode(self, latents) -> torch.Tensor:
        """Latents (B, C, h, w) -> the VAE's images (B, 3, H, W) in [-1, 1], in fp32. SD 3's and FLUX's VAEs also
        shift their latents: z = (latents - shift) * scale."""
        config = self.vae.config
        z = latents.to(self.vae.dtype) / config.scaling_factor + (config.get("shift_factor") or 0)
        return self.vae.decode(z).sample.float()

    def vae_encode(self, images) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the VAE posterior's mean in latent units (what vae_decode inverts)."""
        config = self.vae.config
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean.float()
        return (latents - (config.get("shift_factor") or 0)) * config.scaling_factor

    def decode(self, latents, checkpointed: bool = False) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], differentiable; optionally checkpointed (the VAE decoder's
        activations at 512 px are large)."""
        if checkpointed and torch.is_grad_enabled():
            images = checkpoint(self.vae_decode, latents, use_reentrant=False)
        else:
            images = self.vae_decode(latents)
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (what decode inverts)."""
        return self.vae_encode(images * 2 - 1)

    # ---- the model card ----
    def pipeline_call(self, num_steps: int, guidance_scale: float) -> str:
        """The arguments of the pipeline's call that sample as the scripts did (a model card's example)."""
        return f"num_inference_steps={num_steps}, guidance_scale={guidance_scale}"


def load_model(
    name: str = SD14, revision=None, device="cpu", dtype=None, resolution: int = 512, num_steps: int = 1, t5=True
) -> Model:
    """The model of a hub id or local pipeline folder, frozen, in eval mode, attention through PyTorch's
    scaled_dot_product_attention. Frozen weights in bf16 on CUDA and fp32 elsewhere unless `dtype` is given.
    `resolution` (images are square) and `num_steps`, the sampling steps the caller will take, are checked against
    the model; `t5=False` leaves an SD 3 pipeline's T5 encoder unloaded (as text_encoder_3=None: ~9 GB less at SD 3.5
    scale). Anything that cannot be loaded or used ends the program with one sentence."""
    from common.families import family_of

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # model_index.json is the smallest file: a wrong id or no network fails here, before any download
    index = load_or_fail(DiffusionPipeline.load_config, name, revision=revision)
    family = family_of(name, index)
    scheduler = load_scheduler(family, name, revision, num_steps)
    kwargs = dict(revision=revision, torch_dtype=dtype)
    text_encoders, tokenizers = [], []
    for encoder_folder, tokenizer_folder, encoder_class, tokenizer_class in family.text_encoders_to_load(index, t5):
        for folder in (encoder_folder, tokenizer_folder):  # a library may hand back a default tokenizer for a gap
            if os.path.isdir(name) and not os.path.isdir(os.path.join(name, folder)):
                fail(f"'{name}' has no '{folder}' folder, which its model_index.json names")
        text_encoders.append(load_or_fail(encoder_class.from_pretrained, name, subfolder=encoder_folder, **kwargs))
        tokenizer = load_or_fail(tokenizer_class.from_pretrained, name, subfolder=tokenizer_folder, revision=revision)
        if len(tokenizer) < 10:  # transformers returns an empty tokenizer, not an error, when the files are missing
            fail(f"'{name}' has no tokenizer files in its '{tokenizer_folder}' folder")
        tokenizers.append(tokenizer)
    denoiser = load_or_fail(family.denoiser_class.from_pretrained, name, subfolder=family.denoiser_folder, **kwargs)
    vae = load_or_fail(family.vae_class.from_pretrained, name, subfolder="vae", **kwargs)
    for module in (*text_encoders, denoiser, vae):
        module.requires_grad_(False).eval().to(device)
    if isinstance(vae, AutoencoderKL):  # the other families' attention uses scaled_dot_product_attention already
        vae.set_attn_processor(AttnProcessor2_0())
    if family.denoiser_folder == "unet":
        denoiser.set_attn_processor(AttnProcessor2_0())
    large = sum(p.numel() for p in denoiser.parameters()) > 10**8
    if device.type == "cpu" and large and os.environ.get("RANK", "0") == "0":
        print(
            f"note: no CUDA device: '{name}' will be very slow on the CPU (try --preset tiny, the shipped tiny model)"
        )
    model = family(index, tokenizers, text_encoders, denoiser, vae, scheduler, resolution, dtype)
    check_shapes(model, name, resolution)
    model.schedule(num_steps)  # the sampler's schedule, checked now (and cached)
    for hook in hooks.model_loaded:
        hook(model)
    return model


def load_scheduler(family: type[Model], name: str, revision, num_steps: int):
    """The family's scheduler from the pipeline's config: the flow scheduler (its velocity called "flow"), or for SD's
    VP path a DDIMScheduler (whatever scheduler the pipeline ships, its betas are what DDIM needs)."""
    config = load_or_fail(DDIMScheduler.load_config, name, subfolder="scheduler", revision=revision)
    try:
        if family.flow:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
            scheduler.register_to_config(prediction_type="flow")  # the velocity eps - x0 (the config names none)
        else:
            # SD never clips x0_hat (StableDiffusionPipeline turns clip_sample off too); the DDIM step has no
            # clipping. SDXL ships an Euler config without set_alpha_to_one, which DDIMScheduler would default to True
            # (a last step into abar = 1, without noise): it is trained on SD's betas, so its DDIM ends as SD 1.x's
            # config says, at alphas_cumprod[0], and every step keeps its noise
            alpha_to_one = config.get("set_alpha_to_one", False)
            scheduler = DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=alpha_to_one)
    except (NotImplementedError, ValueError, TypeError) as e:  # e.g. a beta_schedule diffusers does not know
        fail(f"'{name}' has a scheduler config these scripts cannot use ({str(e).splitlines()[0][:200]})")
    if not family.flow and scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        fail(
            f"'{name}' predicts '{scheduler.config.prediction_type}'; these scripts need a model that predicts"
            " 'epsilon' (SD 1.x, SD 2.x base, SDXL) or 'v_prediction' (SD 2.x at 768 px)"
        )
    if num_steps > scheduler.config.num_train_timesteps:
        steps = scheduler.config.num_train_timesteps
        fail(f"--num-steps must be at most the scheduler's {steps} training timesteps, got {num_steps}")
    return scheduler


def check_shapes(model: Model, name: str, resolution: int) -> None:
    """The denoiser reads the VAE's latents (not an inpainting model's extra channels), and the resolution is one the
    VAE and the transformer's patches divide and its positional embedding covers; else one sentence."""
    channels = model.denoiser.config.in_channels // (4 if model.packed else 1)
    if channels != model.latent_channels:
        fail(
            f"'{name}' has a denoiser of {channels} input channels for latents of {model.latent_channels}: an"
            " inpainting or other image-conditioned model, not text-to-image"
        )
    factor = model.latent_multiple()
    if resolution % factor or resolution < factor:
        patch = " times the transformer's patch size" if factor > model.vae_scale_factor else ""
        why = "the VAE's downsampling" + patch
        fail(f"--resolution must be a positive multiple of {factor} ({why}), got {resolution}")
    patches = model.denoiser.config.get("pos_embed_max_size") or math.inf  # SD 3's positional embedding, a side
    if resolution > factor * patches:
        fail(
            f"--resolution must be at most {factor * patches} for this transformer (its positional embedding covers"
            f" {patches} patches a side), got {resolution}"
        )
