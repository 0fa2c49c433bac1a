"""A run's model card (README.md in the Hugging Face Hub's format) and its upload with --push-to-hub. The card says
what was trained, how, how well on the held-out prompts, and how to load the LoRA with plain diffusers."""

import os
import re
import shlex
import sys

from common.cli import fail

UPLOADED = ["README.md", "pytorch_lora_weights.safetensors"]


def check_hub(repo_id: str | None) -> str:
    """--push-to-hub, checked before any training: Hub access (not offline, a valid token) and a well-formed repo id.
    Returns the account the repository goes under when `repo_id` names none."""
    from huggingface_hub import HfApi, constants, get_token

    if repo_id is not None and (repo_id.count("/") > 1 or not repo_id.strip("/")):
        fail(f"--hub-model-id must be name or user/name, got {repo_id!r}")
    if constants.HF_HUB_OFFLINE:
        fail("--push-to-hub cannot upload with HF_HUB_OFFLINE=1 set: unset it, or leave --push-to-hub out")
    if not get_token():
        fail("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    try:
        return HfApi().whoami()["name"]
    except Exception as e:  # no network, or a token the Hub refuses
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        fail(f"--push-to-hub cannot reach the Hugging Face Hub with this token ({reason})")


def model_card(
    run_dir: str,
    args,
    method: str,
    model,
    reward: str,
    grid: str | None,
    rewards: dict[str, float | None],
    prompt: str,
    repo_id: str | None = None,
    notes: str = "",
    commands: list[list[str]] = (),
) -> str:
    """The card's text: a YAML header (base model, library, tags, pipeline) and what a user of the LoRA needs.
    `commands`: the run's commands, the one that started it and those that resumed it (relative_command)."""
    script = os.path.basename(sys.argv[0])
    base = args.pretrained_model
    base_link = base if os.path.exists(base) else f"[{base}](https://huggingface.co/{base})"  # a local folder or an id
    reward_tag = re.sub(r"[^\w-]+", "-", os.path.basename(reward)).strip("-")  # a name, a file or a weighted sum
    tags = ["text-to-image", "diffusers", "lora", model.hub_tag, "reward-fine-tuning", script[:-3], reward_tag]
    header = "\n".join(
        [
            "---",
            f"base_model: {args.pretrained_model}",
            "library_name: diffusers",
            "pipeline_tag: text-to-image",
            "tags:",
            *(f"- {tag}" for tag in dict.fromkeys(tags)),
            "---",
        ]
    )
    table = "\n".join(f"| {name} | {value if value is None else f'{value:.4g}'} |" for name, value in rewards.items())
    pipeline = model.pipeline
    return f"""{header}

# {os.path.basename(run_dir)}

A LoRA for {base_link}, fine-tuned to maximise the `{reward}` reward with `{script}`: {method}.

{f"![fixed-seed samples on the held-out prompts at the end of training]({grid})" if grid else ""}

## Held-out reward

| | mean over the held-out prompts' samples |
|---|---|
{table}
{notes}
## How it was trained

```bash
{chr(10).join("python " + shlex.join(command) for command in commands)}
```
{"The first command started the run and each later one resumed it; p" if len(commands) > 1 else "P"}aths are relative
to this folder.

{args.num_steps} sampling steps, guidance {args.guidance_scale}, {args.resolution} px, LoRA rank
{model.denoiser.peft_config["default"].r} on the denoiser's attention projections.

## Use

```python
from diffusers import {pipeline}

pipeline = {pipeline}.from_pretrained("{args.pretrained_model}")
pipeline.load_lora_weights("{repo_id or run_dir}")
image = pipeline({prompt!r}, {model.pipeline_call(args.num_steps, args.guidance_scale)}).images[0]
```
"""


def relative_command(argv: list[str], run_dir: str) -> list[str]:
    """A command line as a model card shows it: the script's name, and every argument that names an existing file or
    folder as a path relative to the run folder (where the card is), so that it says nothing of this machine."""
    paths = [os.path.relpath(os.path.abspath(a), run_dir) if os.path.exists(a) else a for a in argv[1:]]
    return [os.path.basename(argv[0]), *paths]


def push(run_dir: str, repo_id: str, grid: str | None) -> str:
    """Uploads the final LoRA, the card and the last grid to `repo_id` (created if need be); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=run_dir,
            allow_patterns=UPLOADED + ([grid] if grid else []),
            commit_message="LoRA, model card and samples",
        )
    except Exception as e:  # network, permission, quota: the run folder keeps everything
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        fail(f"could not upload {run_dir} to the Hub repository {repo_id} ({reason}); the run folder is complete")
    return f"https://huggingface.co/{repo_id}"
