"""The shipped tiny model (assets/tiny-sd): it loads through load_model and through plain diffusers, fits its size
budget, and its samples follow their prompts, as read back from the pixels by the world's own `describe`."""

import os

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from common.models import load_model
from common.prompts import PROMPT_SETS
from common.rewards import Colorfulness
from common.sampling import sample
from common.shapes import accuracy, describe, draw, parse, random_captions

TINY_SD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-sd")
RESOLUTION, STEPS, GUIDANCE = 32, 20, 5.0  # the settings assets/README.md recommends
GREY = {"white", "black"}


@pytest.fixture(scope="module")
def model():
    return load_model(TINY_SD, resolution=RESOLUTION)


@pytest.fixture(scope="module")
def samples(model):
    """One sample of each of the 90 prompts of the 'shapes' set."""
    prompts = PROMPT_SETS["shapes"]
    latents = model.initial_latents(len(prompts), torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0, _ = sample(model, latents, model.encode(prompts), STEPS, GUIDANCE)
        return prompts, latents, model.decode(x0)


def test_the_reader_is_exact_on_drawn_images_and_notices_wrong_captions():
    shapes, colours, backgrounds, captions = random_captions(300, torch.Generator().manual_seed(0))
    images = draw(shapes, colours, backgrounds, RESOLUTION, torch.Generator().manual_seed(0))
    assert accuracy(describe(images), captions) == {"colour": 1.0, "background": 1.0, "shape": 1.0, "all": 1.0}
    wrong = accuracy(describe(images), captions[1:] + captions[:1])  # each image against another's caption
    assert max(wrong.values()) < 0.5


def test_the_model_is_sd_shaped_and_small(model):
    config = model.scheduler.config
    assert model.vae_scale_factor == 4 and model.denoiser.config.sample_size * 4 == RESOLUTION
    assert config.beta_schedule == "scaled_linear" and config.steps_offset == 1
    assert not config.set_alpha_to_one and config.prediction_type == "epsilon"
    words = {word for prompt in PROMPT_SETS["shapes"] for word in prompt.split()}
    assert all(len(model.tokenizers[0].tokenize(word)) == 1 for word in words)  # merged whole
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(TINY_SD) for f in files)
    assert size <= 10e6


def test_plain_diffusers_gives_the_same_images(samples):
    prompts, latents, images = samples
    pipeline = StableDiffusionPipeline.from_pretrained(TINY_SD)
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    theirs = pipeline(
        prompts[:4], num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents[:4], height=RESOLUTION,
        width=RESOLUTION, output_type="pt",
    ).images  # fmt: skip
    torch.testing.assert_close(theirs, images[:4], rtol=1e-4, atol=1e-4)


def test_samples_follow_their_prompts(samples):
    prompts, _, images = samples
    follow = accuracy(describe(images), prompts)
    assert follow["colour"] >= 0.9 and follow["background"] >= 0.9 and follow["shape"] >= 0.9, follow


def test_colorfulness_separates_grey_from_saturated_prompts(samples):
    prompts, _, images = samples
    colorfulness = Colorfulness()(images)
    grey = torch.tensor([{parse(p)["colour"], parse(p)["background"]} == GREY for p in prompts])
    saturated = torch.tensor([GREY.isdisjoint({parse(p)["colour"], parse(p)["background"]}) for p in prompts])
    # white on black scores under 20, two saturated colours over 100 (assets/README.md): a reward with room to rise
    assert 4 * colorfulness[grey].mean() < colorfulness[saturated].mean() and colorfulness.std() > 20
