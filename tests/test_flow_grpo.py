"""Flow-GRPO's pieces (docs/ALGORITHMS.md, 1.10 and 3): the prompt-following reward of the tiny models' world, held-out
prompt combinations, Flow-GRPO's step against its formula, and ddpo.py's recipes (a window of noisy steps, sampling
and training without guidance, an EMA of the LoRA), each observed in a real run of the script."""

import math
import os
from typing import get_args

import pytest
import torch

from common.lora import EMA
from common.models import load_model
from common.prompts import COLOURS, PROMPT_SETS, SHAPES, UNSEEN_PAIRS
from common.rewards import REWARDS, RewardName, make_reward
from common.sampling import SAMPLERS, ddim_step, flow_grpo_step, randn, sample
from common.shapes import draw, parse
from scripts import EPOCHS_TINY, check_resume, read_metrics, run_script

TINY_SD3 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-sd3")


# ---- the reward and the prompts ----
def test_prompt_following_is_the_share_of_parts_shown_on_drawn_images():
    """On images drawn by common.shapes.draw: 1 for the image's own caption, 2/3, 1/3 and 0 as one, two and three of
    its parts (shape, colour, background) are changed in the prompt; exact, for every shape and colour."""
    reward = make_reward("prompt_following")
    generator = torch.Generator().manual_seed(0)
    cases, expected = [], []
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOURS):
            b = (c + 1 + s) % len(COLOURS)
            other_shape, other_colour, other_background = (
                SHAPES[(s + 1) % 3],
                COLOURS[(c + 2) % 6],
                COLOURS[(b + 3) % 6],
            )
            for wrong, share in ((0, 1), (1, 2 / 3), (2, 1 / 3), (3, 0)):
                words = [other_shape if wrong >= 1 else shape, other_colour if wrong >= 2 else colour]
                words.append(other_background if wrong >= 3 else COLOURS[b])
                cases.append((s, c, b, f"a {words[1]} {words[0]} on a {words[2]} background"))
                expected.append(share)
    shapes, colours, backgrounds, prompts = zip(*cases)
    images = draw(torch.tensor(shapes), torch.tensor(colours), torch.tensor(backgrounds), generator=generator)
    torch.testing.assert_close(reward(images, list(prompts)), torch.tensor(expected), rtol=0, atol=1e-6)


def test_the_rewards_flag_choices_are_the_rewards():
    assert sorted(get_args(RewardName)) == sorted(REWARDS)


def test_prompt_following_refuses_prompts_outside_the_shapes_world(capsys):
    reward = make_reward("prompt_following")
    with pytest.raises(SystemExit) as exit_info:
        reward(torch.rand(1, 3, 32, 32), ["a photo of a cat"])
    assert exit_info.value.code == 2
    assert "shapes prompts only" in capsys.readouterr().err


def test_unseen_prompts_hold_out_a_third_of_the_colour_shape_pairs():
    """The held-out prompts' colour-shape pairs never occur in training (with any background); each shape is held out
    in two colours and each colour with one shape, so every word is trained on, only the combination is new."""
    seen, unseen = PROMPT_SETS["shapes_seen"], PROMPT_SETS["shapes_unseen"]
    pairs = lambda prompts: {(parse(p)["colour"], parse(p)["shape"]) for p in prompts}  # noqa: E731
    assert pairs(unseen) == UNSEEN_PAIRS and not pairs(seen) & UNSEEN_PAIRS
    assert len(seen) == 60 and len(unseen) == 30 and sorted(seen + unseen) == sorted(PROMPT_SETS["shapes"])
    assert sorted(s for _, s in UNSEEN_PAIRS) == sorted(SHAPES * 2) and sorted(c for c, _ in UNSEEN_PAIRS) == sorted(
        COLOURS
    )
    for word in COLOURS + SHAPES:
        assert any(word in p.split() for p in seen)


# ---- Flow-GRPO's step ----
@pytest.fixture(scope="module")
def flow_model(tiny_sd3_path):
    return load_model(tiny_sd3_path, resolution=32)


def test_flow_grpo_step_follows_its_formula(flow_model):
    """Flow-GRPO's step (flow_grpo's sde_step_with_logprob, its "sde" branch), written out here in plain floats per
    sample: s = a sqrt(sigma / (1 - sigma)) (sigma = 1 read as the next sigma in the denominator), dt = sigma_s -
    sigma, mean = x (1 + s^2 dt / (2 sigma)) + u (1 + s^2 (1 - sigma) / (2 sigma)) dt, std = s sqrt(-dt), the sample
    mean + std z; to 1e-6 at every step, the first (sigma = 1) and the last (into x_0) included, one step per sample."""
    schedule, a = flow_model.schedule(8), 0.7
    index = torch.arange(8)
    x, u = torch.randn(2, 8, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    step = flow_grpo_step(schedule, index, u, x, a, generator=torch.Generator().manual_seed(1))
    z = torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = schedule.sigmas.tolist()
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    for b in range(8):
        sigma, sigma_s = sigmas[b], sigmas[b + 1]
        s = a * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))
        dt = sigma_s - sigma
        mean = x[b] * (1 + s**2 / (2 * sigma) * dt) + u[b] * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        std = s * math.sqrt(-dt)
        torch.testing.assert_close(step.mean[b], mean, rtol=0, atol=1e-6)
        assert step.std.flatten()[b].item() == pytest.approx(std, abs=1e-6)
        torch.testing.assert_close(step.latents[b], mean + std * z[b], rtol=0, atol=1e-6)
        assert schedule.flow_grpo_std(a)[b].item() == pytest.approx(std, abs=1e-6)
        one = flow_grpo_step(schedule, b, u[b : b + 1], x[b : b + 1], a, prev_latents=step.latents[b : b + 1])
        torch.testing.assert_close(one.mean[0], step.mean[b], rtol=0, atol=1e-6)


def test_flow_grpo_step_without_noise_is_the_euler_step(flow_model):
    """At a = 0 Flow-GRPO's step is the flow's Euler step, which is DDIM's at eta 0: the window's deterministic steps
    are the same whichever sampler is chosen, and a = 0 samples as the pipeline does."""
    schedule = flow_model.schedule(6)
    x, u = torch.randn(2, 3, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    for i in range(6):
        torch.testing.assert_close(flow_grpo_step(schedule, i, u, x, 0.0).latents, ddim_step(schedule, i, u, x).latents)
    latents = flow_model.initial_latents(2, torch.Generator().manual_seed(0))
    cond = flow_model.encode(["a red circle on a white background"] * 2)
    ddim, _ = sample(flow_model, latents, cond, 6, 5.0)
    flow_grpo, _ = sample(flow_model, latents, cond, 6, 5.0, step=flow_grpo_step)
    torch.testing.assert_close(flow_grpo, ddim)


def test_per_step_eta_draws_noise_only_where_it_is_above_zero(flow_model):
    """sample() with one eta per step (a window): the steps at eta 0 draw no noise, so the trajectory is the one that
    the same generator gives when only those noisy steps draw."""
    latents = flow_model.initial_latents(2, torch.Generator().manual_seed(0))
    cond = flow_model.encode(["a red circle on a white background"] * 2)
    etas = [0.0, 0.0, 0.7, 0.7, 0.0, 0.0]
    for name, step in SAMPLERS.items():
        _, record = sample(flow_model, latents, cond, 6, 1.0, etas, torch.Generator().manual_seed(3), True, step=step)
        generator = torch.Generator().manual_seed(3)
        x = latents
        for i in range(6):
            output = flow_model.predict(x, flow_model.schedule(6).timesteps[i], cond, 1.0)
            noise = randn(x.shape, generator) if etas[i] else 0  # drawn in the same order as the loop draws it
            taken = step(flow_model.schedule(6), i, output, x, etas[i], prev_latents=x)
            x = taken.mean + taken.std * noise
            torch.testing.assert_close(record.latents[i + 1], x, msg=name)
            assert (record.stds[i] > 0).item() == (etas[i] > 0), (name, i)


# ---- the EMA ----
def test_ema_follows_its_update_formula_and_swaps_back():
    """shadow_k+1 = d_k shadow_k + (1 - d_k) w with d_k = min(decay, (1 + k) / (10 + k)); applied() puts the shadow
    in the parameters and the trained weights back after, and a state_dict round trip continues the same average."""
    w = torch.nn.Parameter(torch.zeros(3))
    ema, shadow = EMA([w], decay=0.9), torch.zeros(3)
    for k in range(40):
        with torch.no_grad():
            w.add_(torch.tensor([1.0, -2.0, 0.5]))
        ema.update()
        d = min(0.9, (1 + k) / (10 + k))
        shadow = d * shadow + (1 - d) * w.detach()
        torch.testing.assert_close(ema.shadow[0], shadow)
    trained = w.detach().clone()
    with ema.applied():
        torch.testing.assert_close(w.detach(), shadow)
    torch.testing.assert_close(w.detach(), trained)
    resumed = EMA([w], decay=0.9)
    resumed.load_state_dict(ema.state_dict())
    ema.update(), resumed.update()
    torch.testing.assert_close(resumed.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError):
        EMA([torch.nn.Parameter(torch.zeros(4))], 0.9).load_state_dict(ema.state_dict())


# ---- the recipes in ddpo.py's runs ----
def flow_args(tmp_path, *extra):
    return [*EPOCHS_TINY, "--output-dir", str(tmp_path / "runs"), "--num-steps", "6", "--sample-every", "100", *extra]


def record_steps(monkeypatch) -> list:
    """Each call of the sampler's step function: (step index or indices, eta, with gradient)."""
    calls = []
    for name, step in SAMPLERS.items():

        def recorded(schedule, i, *args, _step=step, **kwargs):
            eta = args[2] if len(args) > 2 else kwargs.get("eta", 0.0)
            calls.append((torch.as_tensor(i).flatten().tolist(), eta, torch.is_grad_enabled()))
            return _step(schedule, i, *args, **kwargs)

        monkeypatch.setitem(SAMPLERS, name, recorded)
    return calls


SLIDING = pytest.param("sliding", "flow_grpo", marks=pytest.mark.slow)


@pytest.mark.parametrize(("placement", "sampler"), [("random", "ddim"), SLIDING])
def test_a_window_samples_w_noisy_steps_and_trains_exactly_them(
    sampler, placement, tiny_sd3_path, tmp_path, monkeypatch
):
    """--sde-window 2 over 3 epochs: each round's sampling draws noise at exactly 2 consecutive steps of the noisy
    ones (sliding: the first two, then one later each epoch), every other step deterministic, and the training
    computes log-probabilities at exactly those 2 steps of each sample: no other step gets a gradient."""
    calls = record_steps(monkeypatch)
    args = ["--pretrained-model", tiny_sd3_path, "--sampler", sampler, "--sde-window", "2", "--num-epochs", "3"]
    run_script("ddpo.py", flow_args(tmp_path, *args, "--window-placement", placement, "--eta", "0.7"), monkeypatch)
    noisy = list(range(5)) if sampler == "flow_grpo" else list(range(4))  # DDIM: a flow's last two are not (1.7)
    rounds, current = [], None
    for i, eta, grad in calls:
        if not grad and len(i) == 1 and i[0] == 0:  # a round (or an evaluation) starts
            current = {"noisy": [], "trained": set()}
            rounds.append(current)
        if not grad and eta > 0:
            current["noisy"] += i
        if grad:
            current["trained"].update(i)
            assert eta == 0.7
    rounds = [r for r in rounds if r["noisy"]]  # evaluations sample at eta 0
    assert len(rounds) == 3 * 2  # 3 epochs of 2 sampling batches
    windows = [sorted(set(r["noisy"])) for r in rounds[::2]]
    for r in rounds:
        assert len(r["noisy"]) == 2 and r["noisy"][1] == r["noisy"][0] + 1 and set(r["noisy"]) <= set(noisy)
    for w, r in zip(windows, rounds[1::2]):  # the training follows the round's second batch
        assert r["trained"] == set(w)
    if placement == "sliding":
        assert windows == [[0, 1], [1, 2], [2, 3]]


@pytest.mark.parametrize("train_guidance", [pytest.param(True, marks=pytest.mark.slow), False])
def test_guidance_free_training_makes_one_denoiser_call_a_step(train_guidance, tiny_sd3_path, tmp_path, monkeypatch):
    """--no-train-guidance: the sampling rounds and the training call the denoiser once per step on the batch (batch
    2 and 2); with guidance, on the batch twice over (4 and 4). The evaluations keep guidance (8 images: 16)."""
    from common import hooks

    sizes = []
    monkeypatch.setattr(hooks, "model_loaded", [lambda m: m.denoiser.register_forward_pre_hook(
        lambda _, inputs, kwargs: sizes.append(len(kwargs["hidden_states"])), with_kwargs=True)])  # fmt: skip
    flags = ["--pretrained-model", tiny_sd3_path, "--num-epochs", "1", "--validation-prompts", "a", "b", "c", "d"]
    run_script(
        "ddpo.py", flow_args(tmp_path, *flags, *([] if train_guidance else ["--no-train-guidance"])), monkeypatch
    )
    factor = 2 if train_guidance else 1
    assert set(sizes) == {2 * factor, 16}
    assert sizes.count(2 * factor) == 2 * 6 + 2 * 4  # 2 sampling batches x 6 steps, 2 training batches x 4 steps


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ddpo.py", "rwr.py"])
def test_ema_evaluates_with_the_average_and_saves_it_beside_the_lora(script, tiny_sd3_path, tmp_path, monkeypatch):
    """--ema-decay: the run's end saves the average in ema/ (loadable as the LoRA is) and it differs from the LoRA
    after training; the last evaluation samples with it (its reward is the EMA's, not the trained LoRA's)."""
    from safetensors.torch import load_file

    flags = ["--pretrained-model", tiny_sd3_path, "--num-epochs", "2", "--ema-decay", "0.5", "--learning-rate", "3e-2"]
    end = run_script(script, flow_args(tmp_path, *flags), monkeypatch)
    run_dir, metrics = read_metrics(tmp_path / "runs")
    lora = load_file(os.path.join(run_dir, "pytorch_lora_weights.safetensors"))
    ema = load_file(os.path.join(run_dir, "ema", "pytorch_lora_weights.safetensors"))
    assert lora.keys() == ema.keys() and any(not torch.equal(lora[k], ema[k]) for k in lora)
    run, model = end["run"], end["model"]

    def held_out_reward():  # what Run.evaluate computes, with the weights the model holds now
        x0, _ = sample(model, run.eval_latents, run.eval_cond, 6, end["args"].guidance_scale)
        return run.reward_fn(model.decode(x0), run.eval_prompts * 2).mean().item()

    with end["ema"].applied():
        assert held_out_reward() == pytest.approx(metrics[-1]["eval_reward_mean"])
    assert held_out_reward() != pytest.approx(metrics[-1]["eval_reward_mean"])


@pytest.mark.slow
def test_resume_keeps_the_window_draws_and_the_ema(tiny_sd3_path, tmp_path, monkeypatch):
    """A run stopped and resumed logs the uninterrupted run's numbers with a random window (drawn from the run's
    generator, which the checkpoint keeps) and Flow-GRPO's step, and ends with the same EMA (its last evaluation)."""
    flags = ["--sampler", "flow_grpo", "--eta", "0.7", "--sde-window", "2", "--ema-decay", "0.5", "--num-steps", "6"]
    check_resume("ddpo.py", ["--pretrained-model", tiny_sd3_path, *EPOCHS_TINY, *flags], "--num-epochs", tmp_path,
                 monkeypatch)  # fmt: skip
    last = [read_metrics(tmp_path / folder)[1][-1]["eval_reward_mean"] for folder in ("once", "twice")]
    assert last[0] == pytest.approx(last[1], rel=1e-5)


def test_flow_grpo_sampler_is_refused_on_a_model_that_is_not_a_flow(tiny_sd_path, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script(
            "ddpo.py", flow_args(tmp_path, "--pretrained-model", tiny_sd_path, "--sampler", "flow_grpo"), monkeypatch
        )
    assert exit_info.value.code == 2 and "not one: use ddim" in capsys.readouterr().err
