"""Shared pieces of the six scripts: SD loading and LoRA (`sd`), DDIM sampling (`sampling`),
rewards (`rewards`) and prompt sets (`prompts`). Only what is the same in every method lives here."""
import sys
import warnings
from typing import NoReturn

# diffusers 0.42 still passes this retired argument to huggingface_hub, which warns on every config load
warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


def fail(message: str) -> NoReturn:
    """End the program on a user error with one clear sentence and exit status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_positive(args, *names: str) -> None:
    """End the program with one sentence if any of the named arguments (sizes, counts) is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def load_or_fail(load, model_id: str, **kwargs):
    """`load(model_id, **kwargs)` (a `from_pretrained` or `hf_hub_download`); a model that cannot be found or
    downloaded ends the run with one sentence saying which id failed and what to do."""
    try:
        return load(model_id, **kwargs)
    except (OSError, ValueError) as e:  # huggingface_hub's not-found and connection errors are OSErrors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        fail(
            f"could not load '{model_id}'"
            + (f" (subfolder '{kwargs['subfolder']}')" if kwargs.get("subfolder") else "")
            + f": pass a local folder instead, check the network connection, or set HF_HUB_OFFLINE=1 to use"
            f" the local Hugging Face cache only ({reason})"
        )
