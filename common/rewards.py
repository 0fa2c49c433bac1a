"""Rewards by name. Each is an nn.Module called as reward(images, prompts) -> (B,) float32 tensor, with images
(B, 3, H, W) in [0, 1], and a class attribute `differentiable` (DRaFT and BRAID need True). The weight-free ones live
here, the models in common/reward_models.py. `make_reward` also builds a user's own reward from a file (path.py:Name),
a served one (http://HOST:PORT/PATH) and weighted sums (aesthetic+0.2*colorfulness). `Scorer` scores in a thread."""

import importlib.util
import inspect
import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from common import hooks
from common.cli import fail
from common.prompts import SHAPES
from common.reward_models import Aesthetic, ClipScore, HPSv2, HPSv21, ImageReward, PickScore


def jpeg_size_kb(images) -> torch.Tensor:
    """Size in kB of each image saved as JPEG at quality 95 (PIL), as in DDPO's public code."""
    arrays = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, device=images.device)


class JpegCompressibility(nn.Module):
    """-(JPEG size in kB): smaller files score higher. Not differentiable."""

    differentiable = False

    def forward(self, images, prompts=None):
        return -jpeg_size_kb(images)


class JpegIncompressibility(nn.Module):
    """+(JPEG size in kB): larger files score higher. Not differentiable."""

    differentiable = False

    def forward(self, images, prompts=None):
        return jpeg_size_kb(images)


class Colorfulness(nn.Module):
    """Hasler and Suesstrunk (2003) colourfulness on the 0-255 scale: sqrt(var_rg + var_yb) + 0.3 sqrt(mu_rg^2 +
    mu_yb^2), rg = R - G, yb = (R + G) / 2 - B; about 0 for grey, above 100 for very colourful images.
    Differentiable and weight-free (a small epsilon keeps the square roots differentiable at 0)."""

    differentiable = True

    def forward(self, images, prompts=None):
        red, green, blue = (images.float() * 255).unbind(1)  # each (B, H, W)
        rg, yb = red - green, 0.5 * (red + green) - blue
        spread = (rg.var(dim=(1, 2), unbiased=False) + yb.var(dim=(1, 2), unbiased=False) + 1e-8).sqrt()
        offset = (rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2 + 1e-8).sqrt()
        return spread + 0.3 * offset


class PromptFollowing(nn.Module):
    """Prompt following in the tiny models' world (assets/tiny-sd, tiny-sd3), the analogue of GenEval's checks: per
    image, the share of its prompt's three parts (the shape, its colour, the background's colour) that the image shows,
    read back from the pixels by common.shapes.describe (exact on drawn images): 0, 1/3, 2/3 or 1. Not differentiable.
    Takes the shapes prompts only ("a red circle on a white background")."""

    differentiable = False

    def forward(self, images, prompts):
        from common.shapes import describe, parse

        unknown = [p for p in prompts if len(p.split()) != 7 or p.split()[2] not in SHAPES]
        if unknown:
            fail(f"the prompt_following reward reads the tiny models' shapes prompts only, got {unknown[0]!r}")
        parts = ("shape", "colour", "background")
        shown = [sum(d[k] == parse(p)[k] for k in parts) / 3 for d, p in zip(describe(images), prompts)]
        return torch.tensor(shown, device=images.device)


# the names of REWARDS, as a flag's choices (the methods that need no gradient of the reward)
RewardName = Literal[
    "aesthetic", "pickscore", "hpsv2", "hpsv2.1", "clipscore", "imagereward", "colorfulness", "jpeg_compressibility",
    "jpeg_incompressibility", "prompt_following",
]  # fmt: skip
REWARDS = {
    "aesthetic": Aesthetic,
    "pickscore": PickScore,
    "hpsv2": HPSv2,
    "hpsv2.1": HPSv21,
    "clipscore": ClipScore,
    "imagereward": ImageReward,
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": JpegIncompressibility,
    "colorfulness": Colorfulness,
    "prompt_following": PromptFollowing,
}


# a built-in reward's own models from a local folder (--reward NAME:FOLDER), instead of the hub: what each expects there
LOCAL_MODELS = {
    "aesthetic": lambda folder: dict(clip_model=folder, head=os.path.join(folder, "aesthetic-model.pth")),
    "pickscore": lambda folder: dict(model=folder, processor=folder),
    "hpsv2": lambda folder: dict(checkpoint=os.path.join(folder, "HPS_v2_compressed.pt")),
    "hpsv2.1": lambda folder: dict(checkpoint=os.path.join(folder, "HPS_v2.1_compressed.pt")),
    "clipscore": lambda folder: dict(model=folder),
    "imagereward": lambda folder: dict(checkpoint=folder, tokenizer=folder),  # ImageReward.pt, med_config.json
}
MAX_WEIGHT = 1e6  # a weight beyond this is a typo (1e300 would overflow the sum)


class FunctionReward(nn.Module):
    """A user's reward function as a module: fn(images, prompts) -> (B,); differentiable if fn.differentiable."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.differentiable = fn, bool(getattr(fn, "differentiable", False))

    def forward(self, images, prompts=None):
        return self.fn(images, prompts)


class WeightedSum(nn.Module):
    """sum_i w_i r_i(images, prompts); differentiable if every part is."""

    def __init__(self, parts: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.names, self.parts = list(parts), nn.ModuleList(parts.values())  # names may hold dots: not module keys
        self.weights = weights
        self.differentiable = all(part.differentiable for part in parts.values())

    def forward(self, images, prompts=None):
        return {name: part(images, prompts) for name, part in zip(self.names, self.parts)}


class Reward(nn.Module):
    """What make_reward returns: the reward `spec` (one reward or a weighted sum of them), whose every call is
    checked: a part that raises, returns something other than one float per image, or a value that is not finite
    ends the run with one sentence naming the part (a user's file: its line; the traceback goes to the run folder's
    error.log). `last` holds each part's rewards of the last call of a sum (detached), so they can be logged apart."""

    def __init__(self, spec: str, parts: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.spec, self.sum, self.last = spec, WeightedSum(parts, weights), {}
        self.differentiable = self.sum.differentiable

    def forward(self, images, prompts=None):
        try:
            values = self.sum(images, prompts)
        except (torch.OutOfMemoryError, MemoryError):
            raise  # the run's own sentence for it names the flags that lower memory
        except Exception as e:  # a user's reward, or a model's: the sentence says where
            fail(raised(self.spec, e))
        for name, value in values.items():
            check_value(name, value, len(images))
        self.last = {name: value.detach() for name, value in values.items()} if len(values) > 1 else {}
        for part in self.sum.parts:  # a server's other numbers per image (common/remote.py), logged by their keys
            self.last.update(getattr(part, "extras", {}))
        return sum(self.sum.weights[name] * value for name, value in values.items())


class Scorer:
    """Scores sampling batches with `reward_fn` in one worker thread, so that a batch's scoring (a server's round trip,
    a large reward model) overlaps the sampling of the next, as ddpo-pytorch's executor does; `background=False`
    scores at once. Either way `submit` returns a Future of the reward's (B,) tensor, the same numbers (the reward
    sees the same images and prompts). A reward that ends the run does so when its result is asked for."""

    def __init__(self, reward_fn, background: bool = True):
        self.reward_fn, self.failed = reward_fn, False
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="reward") if background else None

    def submit(self, images, prompts) -> Future:
        if self.pool is not None:
            return self.pool.submit(self.score, images, prompts)
        future = Future()
        future.set_result(self.score(images, prompts))
        return future

    @torch.no_grad()
    def score(self, images, prompts) -> torch.Tensor:
        if self.failed:  # an earlier batch's reward ended the run: the batches queued after it are not scored
            raise SystemExit(2)
        try:
            return self.reward_fn(images, prompts).float()
        except BaseException:
            self.failed = True
            raise


def raised(spec: str, e: Exception) -> str:
    """The sentence for a reward that raised: its exception, and for a user's file the line it raised at; the full
    traceback is appended to the run folder's error.log (common.cli.Running) when there is one."""
    import traceback

    from common.cli import Running

    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith(".py") and "site-packages" not in
              f.filename and f"{os.sep}common{os.sep}" not in f.filename]  # fmt: skip
    where = f" at {frames[-1].filename}, line {frames[-1].lineno}" if frames else ""
    log = ""
    if Running.folder and os.path.isdir(Running.folder):
        path = os.path.join(Running.folder, "error.log")
        with open(path, "a") as f:
            f.write("".join(traceback.format_exception(e)))
        log = f"; the traceback is in {path}"
    reason = (str(e).strip().splitlines() or [""])[0][:150]
    return f"the reward '{spec}' raised {type(e).__name__}{where} ({reason}){log}"


def check_value(name: str, value, batch: int) -> None:
    """One part's output: a float tensor of one finite value per image, or one sentence saying what it was."""
    if not (isinstance(value, torch.Tensor) and value.shape == (batch,) and value.is_floating_point()):
        got = (
            f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        )
        fail(f"the reward '{name}' must return a float tensor (B,) for images (B, 3, H, W), got {got}")
    if not value.detach().isfinite().all():
        bad = value.detach()[~value.detach().isfinite()][0].item()
        fail(f"the reward '{name}' returned {bad} for an image: every reward must be a finite number")


def reward_from_file(spec: str) -> nn.Module:
    """`path.py:Name`: a class (constructed without arguments) or a function of (images, prompts) in a Python file;
    its attribute `differentiable` says whether DRaFT and BRAID may backpropagate through it (default: no)."""
    path, _, name = spec.rpartition(":")
    if not path:
        fail(f"the reward file '{spec}' needs the name of its class or function after a colon: --reward {spec}:Name")
    if not os.path.isfile(path):
        fail(f"the reward file '{path}' does not exist (--reward path/to/file.py:Name)")
    try:
        module_spec = importlib.util.spec_from_file_location(f"user_reward_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except SystemExit as e:  # the file ended the program while being imported: say so, whatever its status
        fail(f"the reward file '{path}' called sys.exit({e.code!r}) while being imported")
    except Exception as e:  # whatever the user's file raises on import
        fail(f"the reward file '{path}' cannot be imported ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
    if not callable(getattr(module, name, None)):
        fail(f"the reward file '{path}' has no class or function named '{name}'")
    obj = getattr(module, name)
    try:
        reward = obj() if inspect.isclass(obj) else FunctionReward(obj)
    except Exception as e:
        fail(raised(spec, e))
    return reward if isinstance(reward, nn.Module) else FunctionReward(reward)


def make_reward(spec: str, device="cpu", dtype=torch.float32, differentiable=False, **kwargs) -> Reward:
    """The reward `spec`, frozen and in eval mode on `device` (its weights in `dtype`): a name of REWARDS (`kwargs` go
    to its constructor: model ids or local paths; NAME:FOLDER takes its models from a local folder), a user's
    `path.py:Name`, a server's `http://HOST:PORT/PATH` (common/remote.py), or a weighted sum of those,
    "aesthetic+0.2*colorfulness" (a term given twice counts twice). `differentiable`: refuse a reward without a
    gradient (DRaFT's and BRAID's need), also one that says it has one and has not. One call on two random images
    checks the contract now rather than mid-run."""
    if differentiable and ("http://" in spec or "https://" in spec):
        fail(f"this method backpropagates through the reward, and a reward served over HTTP ('{spec}') gives none")
    parts, weights = {}, {}
    for term in spec.split("+"):
        weight, _, name = term.partition("*") if "*" in term else ("1", "", term)
        name = name.strip()
        if not name:
            fail(f"the reward '{spec}' has an empty term: name a reward on each side of every + (e.g. a+0.2*b)")
        try:
            value = float(weight)
        except ValueError:
            fail(f"the reward weight '{weight.strip()}' in '{spec}' is not a number (e.g. aesthetic+0.2*colorfulness)")
        if not abs(value) <= MAX_WEIGHT:  # NaN fails the comparison
            fail(f"the reward weight {weight.strip()} in '{spec}' must be a finite number of size at most 1e6")
        weights[name] = weights.get(name, 0.0) + value
        if name in parts:
            continue
        reward_name, _, folder = name.partition(":")
        if name.startswith(("http://", "https://")):
            from common.remote import HttpReward

            parts[name] = HttpReward(name)
        elif name.endswith(".py") or ".py:" in name:
            parts[name] = reward_from_file(name)
        elif name in REWARDS:
            parts[name] = REWARDS[name](**kwargs)
        elif reward_name in LOCAL_MODELS:
            if not os.path.isdir(folder):
                fail(f"the reward '{name}' names the folder '{folder}' for its models, which does not exist")
            parts[name] = REWARDS[reward_name](**LOCAL_MODELS[reward_name](folder))
        else:
            fail(
                f"unknown reward '{name}'; choose one of: {', '.join(REWARDS)}, a file's path.py:Name, a server's"
                " http://HOST:PORT/PATH, or a weighted sum such as aesthetic+0.2*colorfulness"
            )
    reward = Reward(spec, parts, weights).requires_grad_(False).eval().to(device, dtype)
    gradient = differentiable and reward.differentiable
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.set_grad_enabled(gradient):
        value = reward(images.requires_grad_(gradient), ["a red circle on a white background", "a blue square"
                                                          " on a yellow background"])  # fmt: skip
    if differentiable and not reward.differentiable:
        fail(
            f"this method backpropagates through the reward and '{spec}' is not differentiable (a file's reward"
            " says it is with an attribute differentiable = True); use one that is, e.g. aesthetic"
        )
    if gradient and not value.requires_grad:
        fail(f"the reward '{spec}' says it is differentiable, but its value carries no gradient back to the images")
    for hook in hooks.reward_made:
        hook(reward)
    return reward
