"""Shared pieces of the six scripts: SD loading and LoRA (`sd`), DDIM sampling (`sampling`),
rewards (`rewards`) and prompt sets (`prompts`). Only what is the same in every method lives here."""

import dataclasses
import logging
import sys
import warnings
from typing import NoReturn, TypeVar

# diffusers 0.42 still passes this retired argument to huggingface_hub, which warns on every config load
warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
# transformers 5 warns on every run without torchvision that it uses its PIL image processors instead: the rewards
# only read the processor's sizes and statistics, so the backend does not matter here
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage()
)


def fail(message: str) -> NoReturn:
    """End the program on a user error with one clear sentence and exit status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


T = TypeVar("T")


def cli(args_class: type[T], presets: dict[str, dict]) -> T:
    """`tyro.cli(args_class)` whose defaults are those of the preset that `--preset NAME` names (the class's own
    defaults are the first preset's): flags given on the command line still override the preset's values."""
    import tyro

    argv = sys.argv[1:]
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), None)
    if "--preset" in argv[:-1]:
        name = argv[argv.index("--preset") + 1]
    if name not in presets:  # no preset named, or an unknown one: tyro lists the choices in its error
        name = args_class.preset
    return tyro.cli(args_class, default=dataclasses.replace(args_class(), preset=name, **presets[name]))


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
