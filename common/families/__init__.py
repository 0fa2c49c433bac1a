"""The model families, one module each: a subclass of common.models.Model holding only what its diffusers pipeline does
differently (prompt encoding, the denoiser's call, the latents, the schedule's shift, the LoRA's modules). A new family
is one new module here and one line in FAMILIES; no script names a family. Modules load on first use, so a run on
SD 1.4 never imports FLUX's or Qwen-Image's code."""

import importlib

from common.cli import fail

# model_index.json's _class_name -> (module of common.families, class in it)
FAMILIES = {
    "StableDiffusionPipeline": ("sd", "StableDiffusion"),  # SD 1.x, 2.x
    "StableDiffusionXLPipeline": ("sdxl", "StableDiffusionXL"),
    "StableDiffusion3Pipeline": ("sd3", "StableDiffusion3"),  # SD 3, 3.5
    "FluxPipeline": ("flux", "Flux"),  # FLUX.1-dev, FLUX.1-schnell
    "QwenImagePipeline": ("qwen_image", "QwenImage"),
}

# pipelines that are refused, and why
IMAGE_CONDITIONED = "an {} pipeline: use the text-to-image model it was made from"
REFUSED = {
    "StableDiffusionXLImg2ImgPipeline": "an image-to-image pipeline (the SDXL refiner is one): use the SDXL base model",
    "StableDiffusionImg2ImgPipeline": IMAGE_CONDITIONED.format("image-to-image"),
    "StableDiffusionXLInpaintPipeline": IMAGE_CONDITIONED.format("inpainting"),
    "StableDiffusionInpaintPipeline": IMAGE_CONDITIONED.format("inpainting"),
    "FluxFillPipeline": IMAGE_CONDITIONED.format("inpainting"),
    "FluxKontextPipeline": "an image-editing pipeline (FLUX.1 Kontext): use FLUX.1-dev",
    "QwenImageEditPipeline": "an image-editing pipeline: use Qwen/Qwen-Image",
    "QwenImageEditPlusPipeline": "an image-editing pipeline: use Qwen/Qwen-Image",
    "Flux2Pipeline": (
        "a FLUX.2 pipeline, which no family module serves yet: its VAE (AutoencoderKLFlux2) normalises 2 x 2-patched"
        " latents with batch-norm statistics, its prompt is read from three hidden layers of a Mistral Small 3.1"
        " encoder, and its transformer takes 4-axis position ids"
    ),
    "Flux2KleinPipeline": (
        "a FLUX.2 [klein] pipeline, which no family module serves yet: its VAE (AutoencoderKLFlux2) normalises"
        " 2 x 2-patched latents with batch-norm statistics, its prompt is read from three hidden layers of a Qwen3"
        " language model, and its transformer takes 4-axis position ids"
    ),
    "ZImagePipeline": (
        "a Z-Image pipeline, which no family module serves yet: its transformer takes lists of unpadded latents and"
        " prompt states (a Qwen3 chat template's penultimate layer), reversed timesteps and a negated velocity"
    ),
    "SanaPipeline": (
        "a SANA pipeline, which no family module serves yet: its DC-AE autoencoder (AutoencoderDC, 32x), its Gemma 2"
        " text encoder with an instruction prefix and its DPM-Solver flow schedule"
    ),
}


def family_of(name: str, index: dict) -> type:
    """The Model subclass for the pipeline whose model_index.json is `index`, or one sentence saying why none is."""
    kind = index.get("_class_name")
    if not isinstance(kind, str):
        fail(f"'{name}' has a model_index.json without a pipeline class name (_class_name): not a diffusers pipeline")
    if kind in REFUSED:
        fail(f"'{name}' is {REFUSED[kind]}")
    if kind not in FAMILIES:
        fail(f"'{name}' is a {kind}; these scripts take a text-to-image pipeline of one of: {', '.join(FAMILIES)}")
    module, cls = FAMILIES[kind]
    return getattr(importlib.import_module(f"common.families.{module}"), cls)
