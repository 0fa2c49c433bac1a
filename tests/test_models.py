"""Loading each family (SD 1.x/2.x with epsilon and v models, SDXL), prompt encoding as diffusers' pipelines do it,
LoRA save/load round trips through plain diffusers, every script on every family, and clear messages for a missing
or unsupported model."""

import json
import math
import os
import re
import shutil

import pytest
import torch
from conftest import build_tiny_sd, build_tiny_sdxl, text_config
from diffusers import (
    DDIMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel

from common.lora import LORA_WEIGHTS
from common.models import load_model
from common.sampling import sample
from scripts import LENGTH, SCRIPTS, TINY, read_metrics, run_script

PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}
FAMILY_FIXTURES = {"sd": "tiny_sd_path", "sdxl": "tiny_sdxl_path", "sd3": "tiny_sd3_path"}


@pytest.fixture(params=list(FAMILY_FIXTURES))
def family_path(request):
    """A test on each family's tiny random pipeline in turn: (family, path)."""
    return request.param, request.getfixturevalue(FAMILY_FIXTURES[request.param])


def plain_pipeline(family: str, path: str):
    """The family's own diffusers pipeline: for SD 3 as it ships (its flow scheduler), for SD and SDXL with a
    DDIMScheduler as our model builds it: without x0 clipping (which StableDiffusionPipeline also turns off) and with
    SD 1.x's set_alpha_to_one where the config has none (SDXL)."""
    if family == "sd3":
        return StableDiffusion3Pipeline.from_pretrained(path)
    config = DDIMScheduler.load_config(path, subfolder="scheduler")
    alpha_to_one = config.get("set_alpha_to_one", False)
    scheduler = DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=alpha_to_one)
    extra = dict(safety_checker=None) if family == "sd" else dict(add_watermarker=False)
    return PIPELINES[family].from_pretrained(path, scheduler=scheduler, **extra)


PROMPTS = ["a photo of a cat", "a dog"]


def test_load_model_freezes_everything_and_uses_sdpa(tiny_sd_path):
    model = load_model(tiny_sd_path, resolution=32)
    assert model.family == "sd" and model.prediction_type == "epsilon"
    for module in (*model.text_encoders, model.denoiser, model.vae):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
        assert module.dtype == torch.float32  # on CPU
    assert all(isinstance(p, AttnProcessor2_0) for p in model.denoiser.attn_processors.values())
    assert model.vae_scale_factor == 2 and model.initial_latents(3).shape == (3, 4, 16, 16)
    assert load_model(tiny_sd_path, dtype=torch.bfloat16, resolution=32).denoiser.dtype == torch.bfloat16


def test_lora_starts_as_identity_and_is_fp32(tiny_sd_path):
    model = load_model(tiny_sd_path, dtype=torch.bfloat16, resolution=32)
    params = model.add_lora(rank=4)
    assert params and all(p.dtype == torch.float32 for p in params)
    names = [n for n, p in model.denoiser.named_parameters() if p.requires_grad]
    targets = {re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.", n).group(1) for n in names}
    assert targets == {"to_q", "to_k", "to_v", "to_out.0"}
    assert all(p.abs().sum() == 0 for n, p in model.denoiser.named_parameters() if "lora_B" in n)


def our_images(model, seed=0):
    latents = model.initial_latents(len(PROMPTS), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x0, _ = sample(model, latents, model.encode(PROMPTS), num_steps=6, guidance_scale=7.5)
        return latents, model.decode(x0)


def test_saved_lora_loads_into_plain_diffusers_and_for_resuming(family_path, tmp_path):
    family, path = family_path
    model = load_model(path, resolution=32)
    torch.manual_seed(0)
    for p in model.add_lora(rank=4, alpha=8):  # alpha != rank: the scale must travel with the weights
        p.data.normal_(std=0.2)
    latents, images = our_images(model)
    model.save_lora(str(tmp_path))
    assert os.path.isfile(tmp_path / LORA_WEIGHTS)

    # no project code: a user's own diffusers pipeline
    pipeline = plain_pipeline(family, path)
    pipeline.load_lora_weights(str(tmp_path))
    theirs = pipeline(PROMPTS, num_inference_steps=6, guidance_scale=7.5, latents=latents, height=32, width=32,
                      output_type="pt").images  # fmt: skip
    torch.testing.assert_close(theirs, images, rtol=1e-5, atol=1e-5)
    _, base_images = our_images(load_model(path, resolution=32))
    assert (base_images - images).abs().max() > 1e-3  # the LoRA changes the output, so the comparison means something

    # resuming: a fresh LoRA of the same rank takes the saved weights and gives the same images
    resumed = load_model(path, resolution=32)
    resumed.add_lora(rank=4, alpha=8)
    resumed.load_lora(str(tmp_path))
    torch.testing.assert_close(our_images(resumed)[1], images, rtol=0, atol=0)


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_conditioning_is_the_pipelines_encode_prompt_with_and_without_t5(t5, tiny_sd3_path):
    """CLIP-L and CLIP-G penultimate states side by side, padded to T5's width, then T5's 256 token states (zeros
    without T5: the pipeline's text_encoder_3=None); both pooled projections; the empty prompt encoded, not zeroed."""
    model = load_model(tiny_sd3_path, resolution=32, t5=t5)
    extra = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, **extra)
    theirs, negative, pooled, negative_pooled = pipeline.encode_prompt(PROMPTS, None, None, device="cpu")
    ours = model.encode(PROMPTS)
    assert (
        len(model.text_encoders) == 2 + t5 and ours.embeds.shape == (2, 77 + 256, 96) and ours.pooled.shape == (2, 64)
    )
    torch.testing.assert_close(ours.embeds, theirs, rtol=1e-5, atol=1e-5)  # T5 under no_grad: SDPA rounds apart
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    torch.testing.assert_close(model.uncond.embeds.expand(2, -1, -1), negative, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.uncond.pooled.expand(2, -1), negative_pooled, rtol=1e-5, atol=1e-6)
    assert (ours.embeds[:, 77:].abs().sum() == 0) == (not t5) and model.uncond.embeds.abs().sum() > 0


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_conditioning_is_the_pipelines_encode_prompt_and_time_ids(force_zeros, tmp_path):
    """Both encoders' penultimate states side by side, the second's pooled projection, the unconditional half as zeros
    (force_zeros_for_empty_prompt, as SDXL base ships) or as the empty prompt's, and the time ids the pipeline makes
    for a square image at the model's resolution."""
    path = build_tiny_sdxl(tmp_path, force_zeros_for_empty_prompt=force_zeros)
    model, pipeline = load_model(path, resolution=24), plain_pipeline("sdxl", path)
    theirs, negative, pooled, negative_pooled = pipeline.encode_prompt(PROMPTS, device="cpu")
    ours = model.encode(PROMPTS)
    assert ours.embeds.shape == (2, 77, 80) and ours.pooled.shape == (2, 40)
    torch.testing.assert_close(ours.embeds, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    uncond = model.uncond  # encoded once, in a batch of one (the pipeline: of two): float rounding apart
    torch.testing.assert_close(uncond.embeds.expand(2, -1, -1), negative, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond.pooled.expand(2, -1), negative_pooled, rtol=1e-5, atol=1e-6)
    assert (uncond.embeds.abs().sum() == 0) == force_zeros
    time_ids = pipeline._get_add_time_ids((24, 24), (0, 0), (24, 24), torch.float32, 40)
    assert torch.equal(ours.time_ids, time_ids.expand(2, -1)) and torch.equal(uncond.time_ids, time_ids)


def test_lora_of_another_rank_is_refused(tiny_sd_path, tmp_path, capsys):
    model = load_model(tiny_sd_path)
    model.add_lora(rank=4)
    model.save_lora(str(tmp_path))
    other = load_model(tiny_sd_path)
    other.add_lora(rank=2)
    with pytest.raises(SystemExit) as exit_info:
        other.load_lora(str(tmp_path))
    assert exit_info.value.code == 2 and "another --lora-rank" in capsys.readouterr().err


def test_prompts_are_encoded_as_diffusers_does_with_an_sd2_text_encoder(tiny_sd_path):
    """SD 2.x's text encoder is OpenCLIP-H as a CLIPTextModel: GELU, wider (1024), pads with "!", and its last
    hidden state is OpenCLIP's penultimate layer, which is what the pipeline uses (clip_skip None)."""
    model = load_model(tiny_sd_path)
    (tokenizer,) = model.tokenizers
    tokenizer.pad_token = "!"
    torch.manual_seed(0)
    model.text_encoders = [CLIPTextModel(text_config(tokenizer, hidden_act="gelu", hidden_size=48)).eval()]
    pipeline = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=tokenizer,
                                       unet=model.denoiser, scheduler=model.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    theirs, theirs_negative = pipeline.encode_prompt(PROMPTS, "cpu", 1, True)
    ours = model.encode(PROMPTS).embeds
    assert ours.shape == (2, 77, 48)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(model.encode([""]).embeds.expand(2, -1, -1), theirs_negative, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["/no/such/folder", "nobody/no-such-model"])
def test_a_missing_model_ends_with_one_clear_sentence(model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_model(model)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1, message
    assert f"could not load '{model}'" in message and "local folder" in message and "HF_HUB_OFFLINE" in message


def test_a_model_that_predicts_neither_eps_nor_v_is_refused(tmp_path, capsys):
    path = build_tiny_sd(tmp_path, prediction_type="sample")
    capsys.readouterr()  # the builder's progress bars
    with pytest.raises(SystemExit) as exit_info:
        load_model(path)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "predicts 'sample'" in message and "v_prediction" in message, message


# the fast tier runs each script on one of the two families (the full tier on both)
FAST_PAIRS = {("draft_lv.py", "sdxl"), ("ddpo.py", "sd3")}  # the fast tier: each family once


@pytest.mark.parametrize("script, family", [
    pytest.param(script, family, marks=[] if (script, family) in FAST_PAIRS else [pytest.mark.slow])
    for family in ("sdxl", "sd3") for script in SCRIPTS
])  # fmt: skip
def test_every_script_runs_on_every_family(script, family, request, tmp_path, monkeypatch):
    """Nothing in a script names a family: the same command trains a LoRA on an SDXL or an SD 3 pipeline (SD 1.x: every
    other test), with the KL penalty on (on a flow model, DRaFT-K's window reaches a step with noise: its last two
    have none, and their KL is 0, its gradient too; DRaFT-LV's one step is refused, see below)."""
    path = request.getfixturevalue(FAMILY_FIXTURES[family])
    kl = [] if (script, family) == ("draft_lv.py", "sd3") else ["--kl-weight", "1"]
    kl += ["--k", "3"] if (script, family) == ("draft_k.py", "sd3") else []
    run_script(script, ["--pretrained-model", path, *TINY[script], LENGTH[script], "2", "--output-dir", str(tmp_path),
                        *kl], monkeypatch)  # fmt: skip
    run_dir, metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert os.path.isfile(os.path.join(run_dir, LORA_WEIGHTS))


@pytest.mark.parametrize("script, flags, message", [
    ("draft_k.py", ["--k", "2"], "--kl-weight must be 0 with --k 2 on this model: its last 2 steps carry no noise"),
    ("draft_lv.py", [], "--kl-weight must be 0 on this model: the last step, DRaFT-LV's only one with gradient"),
])  # fmt: skip
def test_a_kl_penalty_on_steps_without_noise_is_refused(script, flags, message, tiny_sd3_path, tmp_path, capsys,
                                                        monkeypatch):  # fmt: skip
    """On a flow model the last two steps carry no noise, so a KL penalty on them alone would silently do nothing."""
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, ["--pretrained-model", tiny_sd3_path, *TINY[script], "--kl-weight", "1", *flags,
                            "--output-dir", str(tmp_path)], monkeypatch)  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("error:") == 1, err  # (and loading's bars)
    assert not os.listdir(tmp_path)


def edited_copy(path, tmp_path, index=None, unet=None) -> str:
    """A copy of a pipeline folder with its model_index.json entries or its UNet's config changed."""
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    for file, changes in (("model_index.json", index), ("unet/config.json", unet)):
        if changes:
            config = json.loads((copy / file).read_text())
            (copy / file).write_text(json.dumps({**config, **changes}))
    return str(copy)


@pytest.mark.parametrize("index, unet, message", [
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline"}, None, "is an image-to-image pipeline (the SDXL refiner is"),
    ({"_class_name": "StableDiffusionXLInpaintPipeline"}, None, "is an inpainting pipeline: use the text-to-image"),
    ({"_class_name": "KandinskyPipeline"}, None, "is a KandinskyPipeline; these scripts take a text-to-image pipeline"),
    (None, {"in_channels": 9}, "has a denoiser of 9 input channels for latents of 4: an inpainting or other"),
])  # fmt: skip
def test_a_pipeline_that_is_not_text_to_image_is_refused(index, unet, message, tiny_sdxl_path, tmp_path, capsys):
    path = edited_copy(tiny_sdxl_path, tmp_path, index, unet)
    if unet:  # weights of the shape the config says, or loading would fail first
        UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path, subfolder="unet")).save_pretrained(
            os.path.join(path, "unet")
        )
    with pytest.raises(SystemExit) as exit_info:
        load_model(path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("error:") == 1, err


@pytest.mark.parametrize("family, resolution, message", [
    ("sdxl", 17, "--resolution must be a positive multiple of 2 (the VAE's downsampling), got 17"),
    ("sdxl", 0, "--resolution must be a positive multiple of 2 (the VAE's downsampling), got 0"),
    ("sd3", 18, "must be a positive multiple of 4 (the VAE's downsampling times the transformer's patch size), got 18"),
    ("sd3", 68, "--resolution must be at most 64 for this transformer (its positional embedding covers 16 patches"),
])  # fmt: skip
def test_a_resolution_the_model_cannot_take_is_refused(family, resolution, message, request, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_model(request.getfixturevalue(FAMILY_FIXTURES[family]), resolution=resolution)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_pipeline_folder_without_tokenizer_files_is_refused(tiny_sd_path, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    for name in os.listdir(broken / "tokenizer"):
        os.remove(broken / "tokenizer" / name)
    with pytest.raises(SystemExit):
        load_model(str(broken))
    assert "tokenizer" in capsys.readouterr().err
