"""Loading (epsilon and v models), prompt encoding as diffusers does it, LoRA save/load round trips through plain
diffusers, and clear messages for a missing or unsupported model."""

import os
import re

import pytest
import torch
from conftest import build_tiny_sd, text_config
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel

from common.sampling import decode, initial_latents, sample
from common.sd import LORA_WEIGHTS, add_lora, encode_prompts, load_lora, load_sd, save_lora

PROMPTS = ["a photo of a cat", "a dog"]


def test_load_sd_freezes_everything_and_uses_ddim_with_sdpa(tiny_sd_path):
    sd = load_sd(tiny_sd_path)
    assert isinstance(sd.scheduler, DDIMScheduler) and not sd.scheduler.config.clip_sample
    for module in (sd.text_encoder, sd.unet, sd.vae):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
        assert module.dtype == torch.float32  # on CPU
    assert all(isinstance(p, AttnProcessor2_0) for p in sd.unet.attn_processors.values())
    assert sd.vae_scale_factor == 2
    assert load_sd(tiny_sd_path, dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_lora_starts_as_identity_and_is_fp32(tiny_sd_path):
    sd = load_sd(tiny_sd_path, dtype=torch.bfloat16)
    params = add_lora(sd.unet, rank=4)
    assert params and all(p.dtype == torch.float32 for p in params)
    names = [n for n, p in sd.unet.named_parameters() if p.requires_grad]
    targets = {re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.", n).group(1) for n in names}
    assert targets == {"to_q", "to_k", "to_v", "to_out.0"}
    assert all(p.abs().sum() == 0 for n, p in sd.unet.named_parameters() if "lora_B" in n)


def our_images(sd, seed=0):
    latents = initial_latents(sd, len(PROMPTS), 32, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x0, _ = sample(sd, latents, encode_prompts(sd, PROMPTS), encode_prompts(sd, [""]), num_steps=6)
        return latents, decode(sd, x0)


def test_saved_lora_loads_into_plain_diffusers_and_for_resuming(tiny_sd_path, tmp_path):
    sd = load_sd(tiny_sd_path)
    torch.manual_seed(0)
    for p in add_lora(sd.unet, rank=4, alpha=8):  # alpha != rank: the scale must travel with the weights
        p.data.normal_(std=0.2)
    latents, images = our_images(sd)
    save_lora(sd.unet, str(tmp_path))
    assert os.path.isfile(tmp_path / LORA_WEIGHTS)

    # no project code: a user's own diffusers pipeline
    scheduler = DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path, scheduler=scheduler, safety_checker=None)
    pipeline.load_lora_weights(str(tmp_path))
    theirs = pipeline(PROMPTS, num_inference_steps=6, latents=latents, height=32, width=32, output_type="pt").images
    torch.testing.assert_close(theirs, images, rtol=1e-5, atol=1e-5)
    _, base_images = our_images(load_sd(tiny_sd_path))
    assert (base_images - images).abs().max() > 1e-3  # the LoRA changes the output, so the comparison means something

    # resuming: a fresh LoRA of the same rank takes the saved weights and gives the same images
    resumed = load_sd(tiny_sd_path)
    add_lora(resumed.unet, rank=4, alpha=8)
    load_lora(resumed.unet, str(tmp_path))
    torch.testing.assert_close(our_images(resumed)[1], images, rtol=0, atol=0)


def test_lora_of_another_rank_is_refused(tiny_sd_path, tmp_path, capsys):
    sd = load_sd(tiny_sd_path)
    add_lora(sd.unet, rank=4)
    save_lora(sd.unet, str(tmp_path))
    other = load_sd(tiny_sd_path)
    add_lora(other.unet, rank=2)
    with pytest.raises(SystemExit) as exit_info:
        load_lora(other.unet, str(tmp_path))
    assert exit_info.value.code == 2 and "another --lora-rank" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["/no/such/folder", "nobody/no-such-model"])
def test_a_missing_model_ends_with_one_clear_sentence(model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_sd(model)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1, message
    assert f"could not load '{model}'" in message and "local folder" in message and "HF_HUB_OFFLINE" in message


def test_a_model_that_predicts_neither_eps_nor_v_is_refused(tmp_path, capsys):
    path = build_tiny_sd(tmp_path, prediction_type="sample")
    capsys.readouterr()  # the builder's progress bars
    with pytest.raises(SystemExit) as exit_info:
        load_sd(path)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "predicts 'sample'" in message and "v_prediction" in message, message


def test_prompts_are_encoded_as_diffusers_does_with_an_sd2_text_encoder(tiny_sd_path):
    """SD 2.x's text encoder is OpenCLIP-H as a CLIPTextModel: GELU, wider (1024), pads with "!", and its last
    hidden state is OpenCLIP's penultimate layer, which is what the pipeline uses (clip_skip None)."""
    sd = load_sd(tiny_sd_path)
    sd.tokenizer.pad_token = "!"
    torch.manual_seed(0)
    sd.text_encoder = CLIPTextModel(text_config(sd.tokenizer, hidden_act="gelu", hidden_size=48)).eval()
    pipeline = StableDiffusionPipeline(**vars(sd), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    theirs, theirs_negative = pipeline.encode_prompt(PROMPTS, "cpu", 1, True)
    ours = encode_prompts(sd, PROMPTS)
    assert ours.shape == (2, 77, 48)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(encode_prompts(sd, [""]).expand(2, -1, -1), theirs_negative, rtol=0, atol=0)


def test_a_pipeline_folder_without_tokenizer_files_is_refused(tiny_sd_path, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    for name in os.listdir(broken / "tokenizer"):
        os.remove(broken / "tokenizer" / name)
    with pytest.raises(SystemExit):
        load_sd(str(broken))
    assert "tokenizer" in capsys.readouterr().err
