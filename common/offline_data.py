"""Reading, checking and featurising BRAID's offline data (braid.py holds BRAID's protocol for synthesising it):
- a folder of images with a metadata.jsonl or metadata.csv of `file_name`, `reward` and maybe `prompt` (the layout of
  the `datasets` library's imagefolder, also in a train/ subfolder), or with a scores.csv of `file,score` lines;
- a Hub dataset id (user/name) in that layout, downloaded to the Hugging Face cache;
- a .pt file holding {"scores": (N,)} and either {"images": uint8 (N, 3, H, W)} or {"features": (N, D)}, and maybe
  {"true_rewards": (N,)}, read with torch.load(weights_only=True).
Data plumbing, not the method: every malformed file ends the run with one sentence naming the file and the line or
key (docs/braid.md lists the rules)."""

import csv
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common.cli import fail, load_error, load_or_fail
from common.distributed import gather, sample_generators, shard
from common.prompts import sample_prompts
from common.rewards import Scorer
from common.sampling import sample


def reject(where: str, checks) -> None:
    """End the run with the one sentence f"{where} {why}" of the first (bad, why) in `checks` that is bad."""
    for bad, why in checks:
        if bad:
            fail(f"{where} {why}")


def load_offline_data(path: str, resolution: int, what: str = "--offline-data"):
    """A folder of images with scores.csv (file,score), or a .pt file, as the module docstring describes. A CSV line
    that cannot be used ends the run naming the line; check_offline_data checks what a .pt file holds. `what` names
    where the path came from in the sentence that says it cannot be read."""
    if not path.strip():
        fail(f"{what} is empty: give a folder of images with their scores, a .pt file or a Hub dataset id")
    if what != "--offline-data" and not os.path.isfile(path):
        fail(f"{what} {path} is missing: it cannot be resumed without it; start a new run")
    if os.path.isfile(path) and path.endswith(".pt"):
        try:  # weights_only: tensors, numbers, strings, lists and dicts; a pickle of anything else could run code
            return torch.load(path, weights_only=True)
        except Exception as e:  # corrupt, truncated, not written by torch.save, or holding other objects
            fail(
                f"cannot load {path} with torch.load ({load_error(e)}); it must hold tensors, numbers, strings,"
                " lists and dicts (docs/braid.md)"
            )
    if not os.path.exists(path) and (path.count("/") != 1 or path.endswith((".pt", "/")) or path.startswith(".")):
        fail(f"{what} {path} does not exist (a folder of images with their scores, a .pt file or a Hub dataset id)")
    if not os.path.exists(path) and path.count("/") == 1:  # a Hub dataset id
        from huggingface_hub import snapshot_download

        path = load_or_fail(snapshot_download, path, repo_type="dataset")
    tables = ("metadata.jsonl", "metadata.csv", "scores.csv")
    folders = [f for f in (path, os.path.join(path, "train")) if os.path.isdir(f)]
    folder = next((f for f in folders if any(os.path.isfile(os.path.join(f, t)) for t in tables)), None)
    if folder is None:
        fail(
            f"{what} {path} is neither a .pt file nor a folder of images with a metadata.jsonl, metadata.csv"
            " (file_name, reward, prompt) or scores.csv (file, score)"
        )
    if os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        table, (name_key, score_key) = os.path.join(folder, "metadata.jsonl"), ("file_name", "reward")
        rows, header = read_jsonl(table)
    else:
        table = os.path.join(
            folder, "metadata.csv" if os.path.isfile(os.path.join(folder, "metadata.csv")) else "scores.csv"
        )
        name_key, score_key = ("file", "score") if table.endswith("scores.csv") else ("file_name", "reward")
        rows, header = read_csv(table, f"{name_key},{score_key}")
    reject(table, [(not rows, f"has no rows of {name_key} and {score_key}")])
    images, scores, prompts, seen = [], [], [], {}
    for line, row in rows:
        name, score = str(row.get(name_key) or "").strip(), str(row.get(score_key, "")).strip()
        try:
            value = float(score)
        except ValueError:
            value = math.nan
        reject(
            f"{table}, line {line}:",
            [
                (not name, f"the '{name_key}' {'cell' if table.endswith('.csv') else 'value'} is empty"),
                (name in seen, f"'{name}' is listed twice (also on line {seen.get(name)})"),
                (score_key not in row or row[score_key] in (None, ""), f"it has no '{score_key}'"),
                (not math.isfinite(value), f"the {score_key} '{score}' is not a finite number"),
            ],
        )
        seen[name] = line
        try:
            with Image.open(os.path.join(folder, name)) as image:
                images.append(np.asarray(image.convert("RGB").resize((resolution, resolution))))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, not an image, truncated, a bomb
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:150]  # a NUL in the name: ValueError
            fail(f"{table}, line {line}: cannot read the image {name!r} ({reason})")
        scores.append(value)
        prompts.append(str(row.get("prompt", "")))
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    return {"images": images, "scores": torch.tensor(scores), "prompts": prompts}


def read_csv(table: str, expected: str) -> tuple[list, list]:
    """The (line number, row) of a CSV file with a header line, and its header; one sentence if it is not one."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:  # -sig: skips the byte-order mark Excel writes
            reader = csv.DictReader(f)
            rows, header = [(reader.line_num, row) for row in reader], reader.fieldnames or []
    except (UnicodeError, csv.Error) as e:
        fail(f"{table} is not a CSV text file in UTF-8 ({e})")
    reject(
        table,
        [
            (not header, f"is empty: it needs the header line '{expected}', then one line per image"),
            (not set(expected.split(",")) <= set(header), f"starts with '{','.join(header)}', not '{expected}'"),
        ],
    )
    return rows, header


def read_jsonl(table: str) -> tuple[list, list]:
    """The (line number, object) of a JSON-lines file; one sentence naming the first line that is not an object."""
    rows = []
    try:
        with open(table, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    reject(f"{table}, line {number}:", [(not isinstance(row, dict), "is not a JSON object {...}")])
                    rows.append((number, row))
    except (UnicodeError, json.JSONDecodeError) as e:
        fail(f"{table}, line {number}: is not JSON ({e.msg if hasattr(e, 'msg') else e})")
    return rows, sorted({key for _, row in rows for key in row})


def check_offline_data(data, source: str, feature_dim: int, val_fraction: float) -> int:
    """End the run with one sentence naming the file and the key unless the offline data (a .pt file's, a folder's
    or synthesised) is a dict of 'scores' and 'images' or 'features' (and maybe 'true_rewards') of these forms, with
    enough distinct scores to fit on besides the validation split. Returns the size of that split."""
    if not (isinstance(data, dict) and "scores" in data and ("images" in data or "features" in data)):
        fail(
            f"{source} must hold a dict with 'scores' and either 'images' or 'features', not a {type(data).__name__}"
            + (f" with keys {list(data)}" if isinstance(data, dict) else "")
        )
    x = data["scores"]
    n = len(x) if isinstance(x, torch.Tensor) and x.ndim == 1 else "N"  # every tensor has one row per example
    numbers = lambda x: x.ndim == 1 and x.dtype != torch.bool and not x.is_complex()  # noqa: E731
    rules = {  # key: (what it must be, whether a tensor x is that)
        "scores": ("a 1-D tensor (N,) of finite numbers", numbers),
        "true_rewards": (f"a 1-D tensor ({n},) of finite numbers, one per score", numbers),
        "images": (
            f"a uint8 tensor ({n}, 3, H, W), one image per score (multiply float images in [0, 1] by 255 and"
            " convert them to uint8: (images * 255).round().byte())",
            lambda x: x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3,
        ),
        "features": (
            f"a floating tensor ({n}, {feature_dim}) of finite numbers from the --feature-model, one row per score",
            lambda x: x.is_floating_point() and x.ndim == 2 and x.shape[1] == feature_dim,
        ),
    }
    for key, (form, ok) in rules.items():
        x = data.get(key)
        if key in data and not (isinstance(x, torch.Tensor) and ok(x) and len(x) == n):
            got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
            fail(f"{source}: '{key}' must be {form}, got {got}")
        if key in data and x.is_floating_point() and not x.float().isfinite().all():  # float(): 1e39 is inf
            where = (~x.float().isfinite()).nonzero()[0].tolist()
            fail(
                f"{source}: '{key}' holds a value that is not a finite float32 (NaN, infinity or beyond 3.4e38)"
                f" at {where}"
            )
    num_val = max(1, int(val_fraction * n))
    reject(
        source,
        [  # a head fitted on one example is NaN (the std of one number); equal scores teach nothing
            (
                n - num_val < 10,
                f"has {n} scored examples and --val-fraction holds {num_val} out: the reward model needs"
                " at least 10 others to fit on",
            ),
            (
                len(data["scores"].unique()) == 1,
                "has all its scores equal: the reward model would have nothing to learn",
            ),
        ],
    )
    return num_val


@torch.no_grad()
def offline_features(data, source: str, featurize, resolution: int, val_fraction: float, generator):
    """The checked data's (check_offline_data) features (N, D), from the file or of its images by `featurize`, and
    scores (N,), both on featurize's device, and a random split of their indices: `val_fraction` held out to measure
    the reward model's error, the rest to fit it."""
    device = next(featurize.parameters()).device
    blank = torch.zeros(1, 3, resolution, resolution, device=device)  # tells the feature dimension
    num_val = check_offline_data(data, source, featurize(blank).shape[1], val_fraction)
    if "features" in data:
        features = data["features"].float().to(device)
    else:  # at --resolution, as a folder's images are read and as the fine-tuned model's images are scored
        features = torch.cat(
            [featurize(at_resolution(batch.to(device), resolution)) for batch in data["images"].split(32)]
        )
    order = torch.randperm(len(features), generator=generator).to(device)
    return features, data["scores"].float().to(device), order[:num_val], order[num_val:]


def at_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 images (B, 3, H, W) as floats in [0, 1] at resolution x resolution (bicubic, antialiased, as PIL)."""
    images = images.float() / 255
    if images.shape[-2:] == (resolution, resolution):
        return images
    return F.interpolate(images, (resolution, resolution), mode="bicubic", antialias=True).clamp(0, 1)


@torch.no_grad()
def sample_images(
    model,
    score,
    prompts: list[str],
    size: int,
    batch_size: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    generator,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`size` images (uint8, (N, 3, H, W)) of `model` on prompts drawn from `prompts`, sampled as the script samples
    (`batch_size` a process, with these steps, guidance and eta), their scores by `score` (N,) and their prompts.
    Each batch is scored in a worker thread while the next one samples (common.rewards.Scorer: the same numbers).
    Under torchrun each process samples its slice of every batch; every process gets them all."""
    scorer = Scorer(score)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    images, scores, data_prompts = [], [], []
    global_batch = world_size * batch_size
    batches = range(math.ceil(size / global_batch))
    for _ in tqdm(batches, desc="synthesising offline data", disable=os.environ.get("RANK", "0") != "0"):
        batch_prompts = sample_prompts(prompts, global_batch, generator)
        generators = sample_generators(batch_size, generator)
        latents = model.initial_latents(batch_size, generators)
        cond = model.encode(shard(batch_prompts, batch_size))
        x0, _ = sample(model, latents, cond, num_steps, guidance_scale, eta, generators)
        batch_images = model.decode(x0)
        scores.append(scorer.submit(batch_images, shard(batch_prompts, batch_size)))
        images.append(gather((batch_images * 255).round().byte()).cpu())
        data_prompts += batch_prompts
    scores = [gather(future.result()).cpu() for future in scores]  # in the same order on every process
    return torch.cat(images)[:size], torch.cat(scores)[:size].float(), data_prompts[:size]
