"""FLUX.1-dev, FLUX.1-schnell and Qwen-Image on tiny random pipelines built in code, against their diffusers pipelines:
prompt encoding, the sampler at eta 0 (guidance as each pipeline applies it), LoRA round trips through the pipeline's
own load_lora_weights; every script on both kinds of model; the text encoders freed after encoding the prompts once;
the families that are refused, each in one sentence."""

import json
import math
import os
import shutil

import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline

from common.families.flux import pack
from common.lora import LORA_WEIGHTS
from common.models import load_model
from common.rewards import Colorfulness
from common.sampling import ddim_step, sample, step_kl
from scripts import LENGTH, SCRIPTS, TINY, read_metrics, run_script

PROMPTS = ["a photo of a cat", "a dog"]  # of different lengths: Qwen-Image pads and masks the shorter
FIXTURES = {
    "flux-dev": "tiny_flux_path",
    "flux-schnell": "tiny_flux_schnell_path",
    "qwen-image": "tiny_qwen_image_path",
}
GUIDANCE = {"flux-dev": 3.5, "flux-schnell": 1.0, "qwen-image": 4.0}  # FLUX.1-dev's pipeline default; Qwen's "true"


@pytest.fixture(params=list(FIXTURES))
def kind_path(request):
    return request.param, request.getfixturevalue(FIXTURES[request.param])


def pipeline_images(kind: str, path: str, latents, lora: str | None = None) -> torch.Tensor:
    """The family's own diffusers pipeline from the same folder and x_T (packed, as it draws them), 6 steps."""
    pipeline = (QwenImagePipeline if kind == "qwen-image" else FluxPipeline).from_pretrained(path)
    if lora:
        pipeline.load_lora_weights(lora)
    w = GUIDANCE[kind]
    guidance = dict(negative_prompt=" ", true_cfg_scale=w) if kind == "qwen-image" else dict(guidance_scale=w)
    images = pipeline(PROMPTS, num_inference_steps=6, height=32, width=32, latents=pack(latents), output_type="pt",
                      **guidance).images  # fmt: skip
    return images


def our_images(model, kind: str, seed: int = 0):
    latents = model.initial_latents(len(PROMPTS), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x0, _ = sample(model, latents, model.encode(PROMPTS), num_steps=6, guidance_scale=GUIDANCE[kind])
        return latents, model.decode(x0)


def test_prompt_encoding_is_the_pipelines(kind_path):
    """FLUX: T5's 512 token states and CLIP's pooled output, no unconditional input (no classifier-free guidance).
    Qwen-Image: the language model's last states after the template's 34 tokens, padded and masked, and the negative
    prompt " " as the unconditional input."""
    kind, path = kind_path
    model = load_model(path, resolution=32, num_steps=6)
    ours = model.encode(PROMPTS)
    if kind == "qwen-image":
        pipeline = QwenImagePipeline.from_pretrained(path)
        theirs, mask = pipeline.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
        assert ours.embeds.shape == theirs.shape == (2, 10, 32) and mask.sum(1).tolist() == [10, 7]
        assert torch.equal(ours.mask, mask.bool()) and ours.pooled is None
        torch.testing.assert_close(ours.embeds, theirs, rtol=0, atol=0)
        negative, negative_mask = pipeline.encode_prompt([" "], device="cpu", max_sequence_length=512)
        torch.testing.assert_close(model.uncond.embeds, negative, rtol=0, atol=0)
        assert negative_mask is None and model.uncond.mask.all()  # the pipeline drops a mask that masks nothing
        return
    theirs, pooled, text_ids = FluxPipeline.from_pretrained(path).encode_prompt(PROMPTS, None, device="cpu")
    assert ours.embeds.shape == (2, 512, 48) and ours.pooled.shape == (2, 32) and model.uncond is None
    torch.testing.assert_close(ours.embeds, theirs, rtol=1e-5, atol=1e-5)  # T5 under no_grad: SDPA rounds apart
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def test_sampling_at_eta_0_is_the_pipelines_images(kind_path):
    """The same x_T through our loop and the pipeline's: the flow's dynamic shift (FLUX.1-dev's, Qwen-Image's with
    its terminal sigma) or fixed shift (schnell), the packed transformer call, FLUX.1-dev's guidance input, Qwen's
    rescaled true guidance with the masked shorter prompt, and each VAE's normalisation."""
    kind, path = kind_path
    model = load_model(path, resolution=32, num_steps=6)
    latents, ours = our_images(model, kind)
    assert latents.shape == (2, 4, 32 // model.vae_scale_factor, 32 // model.vae_scale_factor)
    theirs = pipeline_images(kind, path, latents)
    assert ours.std() > 0.05  # the images are not flat, so the comparison means something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_flux_dev_takes_its_guidance_as_an_input_in_one_call_per_step(tiny_flux_path):
    """Guidance-distilled: one transformer call per step whatever --guidance-scale is, and the value changes it."""
    model = load_model(tiny_flux_path, resolution=32, num_steps=6)
    calls = []
    model.denoiser.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    latents, cond, t = model.initial_latents(2), model.encode(PROMPTS), model.schedule(6).timesteps[0]
    outputs = [model.predict(latents, t, cond, w) for w in (1.0, 3.5, 7.0)]
    assert len(calls) == 3 and all(len(c["hidden_states"]) == 2 for c in calls)
    assert [c["guidance"].tolist() for c in calls] == [[1.0, 1.0], [3.5, 3.5], [7.0, 7.0]]
    assert (outputs[1] - outputs[2]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["flux-dev", "qwen-image"])
def test_saved_lora_loads_with_the_pipelines_load_lora_weights_and_for_resuming(kind, request, tmp_path):
    path = request.getfixturevalue(FIXTURES[kind])
    model = load_model(path, resolution=32, num_steps=6)
    torch.manual_seed(0)
    for p in model.add_lora(rank=4, alpha=8):  # alpha != rank: the scale must travel with the weights
        p.data.normal_(std=0.2)
    latents, images = our_images(model, kind)
    model.save_lora(str(tmp_path))
    assert os.path.isfile(tmp_path / LORA_WEIGHTS)
    torch.testing.assert_close(pipeline_images(kind, path, latents, lora=str(tmp_path)), images, rtol=1e-5, atol=1e-5)
    _, base_images = our_images(load_model(path, resolution=32, num_steps=6), kind)
    assert (base_images - images).abs().max() > 1e-3  # the LoRA changes the output, so the comparison means something

    resumed = load_model(path, resolution=32, num_steps=6)
    resumed.add_lora(rank=4, alpha=8)
    resumed.load_lora(str(tmp_path))
    torch.testing.assert_close(our_images(resumed, kind)[1], images, rtol=0, atol=0)


def draft_gradients(model, blocks: bool):
    """Three DDIM steps at eta 1, each with gradient, checkpointed as the scripts call it, the KL to the pretrained
    model on each (whose output is recomputed with the LoRA off), the colourfulness of the decoded images: the
    gradient of their sum for the LoRA and for x_T."""
    if blocks:
        model.checkpoint_blocks()
    schedule, cond = model.schedule(6), model.encode(PROMPTS)
    latents = model.initial_latents(2, torch.Generator().manual_seed(0)).requires_grad_()
    x_t, generator, kl = latents, torch.Generator().manual_seed(1), 0
    for i in range(3, 6):
        t = schedule.timesteps[i]
        output = model.predict(x_t, t, cond, 3.5, checkpointed=True)
        pre = model.predict(x_t, t, cond, 3.5, checkpointed=True, pretrained=True)
        kl = kl + step_kl(schedule, i, output, pre, x_t, 1.0)
        x_t = ddim_step(schedule, i, output, x_t, 1.0, generator=generator).latents
    loss = (Colorfulness()(model.decode(x_t, checkpointed=True)) + 100 * kl).sum()
    lora = [p for p in model.denoiser.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, [latents, *lora])


@pytest.mark.parametrize("fixture", ["tiny_flux_path", pytest.param("tiny_sd_path", marks=pytest.mark.slow)])
def test_block_checkpointing_gives_the_same_gradients(fixture, request):
    """--gradient-checkpointing: each transformer or UNet block recomputed in the backward pass, inside the call's own
    checkpoint, with the LoRA as it was in the call: off for the pretrained model's output, on for the model's."""
    grads = []
    for blocks in (False, True):
        model = load_model(request.getfixturevalue(fixture), resolution=16, num_steps=6)
        torch.manual_seed(0)
        for p in model.add_lora(rank=4):
            p.data.normal_(std=0.2)  # the LoRA changes the output, so its state in a recomputation matters
        grads.append(draft_gradients(model, blocks))
    assert all(g.abs().sum() > 0 for g in grads[0])
    for g, g_blocks in zip(*grads):
        torch.testing.assert_close(g_blocks, g, rtol=1e-4, atol=1e-6)


def test_freed_text_encoders_leave_the_same_conditionings(tiny_qwen_image_path, capsys):
    """--free-text-encoders: each prompt encoded once, the encoders gone; a batch from the cache is what the encoders
    give (padded and masked alike), and a prompt that was not encoded ends in one sentence."""
    model = load_model(tiny_qwen_image_path, resolution=32, num_steps=6)
    expected = model.encode(PROMPTS)
    model.free_text_encoders(PROMPTS + ["a red circle"])
    assert model.text_encoders == [] and set(model.cache) == {*PROMPTS, "a red circle"}
    cached = model.encode(PROMPTS)
    assert torch.equal(cached.mask, expected.mask)
    torch.testing.assert_close(cached.embeds, expected.embeds, rtol=1e-6, atol=1e-6)  # encoded one at a time
    with pytest.raises(SystemExit) as exit_info:
        model.encode(["a blue square"])
    assert exit_info.value.code == 2 and "'a blue square' was not encoded" in capsys.readouterr().err


# the fast tier runs each script on one of the two (the full tier on both)
FAST_PAIRS = {("braid.py", "flux-dev"), ("rwr.py", "qwen-image")}  # the fast tier: each family once


@pytest.mark.parametrize("script, kind", [
    pytest.param(script, kind, marks=[] if (script, kind) in FAST_PAIRS else [pytest.mark.slow])
    for kind in ("flux-dev", "qwen-image") for script in SCRIPTS
])  # fmt: skip
def test_every_script_runs_on_flux_and_qwen_image(script, kind, request, tmp_path, monkeypatch):
    """The same command as on SD 1.x trains a LoRA on FLUX.1-dev and Qwen-Image, with the KL penalty where the steps
    with gradient carry noise (the last two steps of a flow carry none: DRaFT-K's window of 3 reaches one), and the
    text encoders freed after encoding the prompt set once."""
    path = request.getfixturevalue(FIXTURES[kind])
    kl = [] if script == "draft_lv.py" else ["--kl-weight", "1"]
    kl += ["--k", "3"] if script == "draft_k.py" else []
    run_script(script, ["--pretrained-model", path, *TINY[script], LENGTH[script], "2", "--output-dir", str(tmp_path),
                        "--free-text-encoders", "--gradient-checkpointing", *kl], monkeypatch)  # fmt: skip
    run_dir, metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert os.path.isfile(os.path.join(run_dir, LORA_WEIGHTS))
    card = open(os.path.join(run_dir, "README.md")).read()  # how to sample as the script did, in plain diffusers
    call = "guidance_scale=" if kind == "flux-dev" else 'negative_prompt=" ", true_cfg_scale='
    assert f"{'FluxPipeline' if kind == 'flux-dev' else 'QwenImagePipeline'}.from_pretrained" in card and call in card


@pytest.mark.parametrize("class_name, message", [
    ("Flux2Pipeline", "is a FLUX.2 pipeline, which no family module serves yet: its VAE (AutoencoderKLFlux2)"),
    ("Flux2KleinPipeline", "is a FLUX.2 [klein] pipeline, which no family module serves yet"),
    ("ZImagePipeline", "is a Z-Image pipeline, which no family module serves yet: its transformer takes lists"),
    ("SanaPipeline", "is a SANA pipeline, which no family module serves yet: its DC-AE autoencoder"),
    ("FluxKontextPipeline", "is an image-editing pipeline (FLUX.1 Kontext): use FLUX.1-dev"),
    (None, "has a model_index.json without a pipeline class name (_class_name)"),
    (["FluxPipeline"], "has a model_index.json without a pipeline class name (_class_name)"),
])  # fmt: skip
def test_a_family_no_module_serves_is_refused_in_one_sentence(class_name, message, tiny_flux_path, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_flux_path, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    with pytest.raises(SystemExit) as exit_info:
        load_model(str(copy))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("error:") == 1, err


def test_flux_without_t5_is_refused(tiny_flux_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_model(tiny_flux_path, t5=False)
    assert exit_info.value.code == 2 and "FLUX.1's prompt is T5's token states" in capsys.readouterr().err


def test_one_step_on_qwen_image_is_refused(tiny_qwen_image_path, capsys):
    """Its scheduler stretches the sigmas to a terminal 0.02 by dividing by (1 - the last one): 0 / 0 at one step."""
    with pytest.raises(SystemExit) as exit_info:
        load_model(tiny_qwen_image_path, num_steps=1)
    assert exit_info.value.code == 2 and "--num-steps 1 gives this model's scheduler sigmas" in capsys.readouterr().err
