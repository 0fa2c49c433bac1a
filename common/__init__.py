"""Shared pieces of the six scripts: SD loading and LoRA (`sd`), DDIM sampling (`sampling`),
rewards (`rewards`) and prompt sets (`prompts`). Only what is the same in every method lives here."""

import atexit
import dataclasses
import logging
import os
import re
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


def out_of_memory_or_lost_rank(exc_type, exc, traceback) -> None:
    """sys.excepthook: running out of memory (CUDA or CPU) and a torchrun process that stopped answering end in one
    sentence and exit status 2 like the user errors; anything else keeps Python's traceback."""
    message = str(exc)
    if exc_type.__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError) or "can't allocate memory" in message:
        fail_now(
            "ran out of memory: lower the batch size (--batch-size, or --sample-batch-size and --train-batch-size),"
            " --resolution or, for DRaFT-K and BRAID, --k, and raise --grad-accum-steps to keep the same batch"
        )
    lost_peer = re.search(r"timed out|timeout|connection (closed|reset) by peer", message, re.I)
    if isinstance(exc, RuntimeError) and lost_peer and os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun
        fail_now(
            "another process of this torchrun job stopped answering (it died, was stopped, or waited longer than"
            f" DIST_TIMEOUT_S = {os.environ.get('DIST_TIMEOUT_S', 1800)} s), so this one stops too ({message[:120]})"
        )
    sys.__excepthook__(exc_type, exc, traceback)


def fail_now(message: str) -> None:
    """`fail` from inside sys.excepthook, where raising SystemExit no longer sets the exit status. To the real
    stderr: torch.distributed's own excepthook calls this one with sys.stderr swapped for a buffer."""
    print(f"error: {message}", file=sys.__stderr__)
    sys.__stderr__.flush()
    atexit._run_exitfuncs()  # e.g. release the run folder's lock
    os._exit(2)


sys.excepthook = out_of_memory_or_lost_rank

T = TypeVar("T")
# flags that may differ from a checkpoint's when resuming it: they extend, log or place the run, or set the optimizer
# (written into the restored optimizer); every other flag would change the model or the method mid-run
RESUMABLE = {"resume", "train_steps", "num_epochs", "save_every", "sample_every", "track", "wandb_project_name",
             "wandb_entity", "output_dir", "cuda", "torch_deterministic", "mixed_precision", "learning_rate",
             "weight_decay", "max_grad_norm"}  # fmt: skip


def cli(args_class: type[T], presets: dict[str, dict]) -> T:
    """`tyro.cli(args_class)` whose defaults are those of the preset that `--preset NAME` names (the class's own
    defaults are the first preset's): flags given on the command line still override the preset's values.
    With `--resume`, the defaults are the resumed run's own arguments: flags in RESUMABLE may change (each change is
    reported), any other that differs ends the program with one sentence. `args.resume` becomes the checkpoint."""
    import tyro

    from common.checkpoint import find_checkpoint

    argv = sys.argv[1:]

    def given(flag: str) -> str | None:
        value = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")), None)
        return argv[argv.index(f"--{flag}") + 1] if f"--{flag}" in argv[:-1] else value

    name = given("preset") if given("preset") in presets else args_class.preset  # tyro refuses an unknown one
    defaults = dataclasses.replace(args_class(), preset=name, **presets[name])
    if given("resume") and "--help" not in argv and "-h" not in argv:
        checkpoint_dir, state = find_checkpoint(given("resume"))
        saved = {k: v for k, v in state.get("args", {}).items() if k in {f.name for f in dataclasses.fields(defaults)}}
        args = tyro.cli(args_class, default=dataclasses.replace(defaults, **saved))
        for flag, old in saved.items():
            new = getattr(args, flag)
            if new != old and flag not in RESUMABLE:
                option = f"--{flag.replace('_', '-')}"
                fail(f"{option} is {new} but {checkpoint_dir} was trained with {old}: resuming would mix two runs")
            if new != old and flag != "resume" and os.environ.get("RANK", "0") == "0":
                print(f"resuming with --{flag.replace('_', '-')} {new} (was {old})")
        args.resume = checkpoint_dir
        return args
    return tyro.cli(args_class, default=defaults)


def check(args, name: str, ok: bool, allowed: str) -> None:
    """End the program with one sentence naming the flag, its value and what is allowed, unless `ok`."""
    if not ok:
        fail(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(args, name)!r}")


def at_least_1(x) -> bool:
    return x >= 1


# the flags most scripts share, and any script's counts, with what each allows (NaN fails every comparison: refused)
SHARED_FLAGS = {
    "exp_name": (lambda x: bool(re.fullmatch(r"[\w.+-]+", x)) and set(x) != {"."}, "letters, digits, _ . + -"),
    "seed": (lambda x: 0 <= x < 2**32, "between 0 and 2**32 - 1"),
    "save_every": (at_least_1, "at least 1"),
    "sample_every": (at_least_1, "at least 1"),
    "num_steps": (at_least_1, "at least 1"),
    "guidance_scale": (lambda x: 1 <= x < float("inf"), "at least 1 (1: no guidance)"),
    "eta": (lambda x: 0 <= x <= 1, "between 0 and 1"),
    "resolution": (at_least_1, "at least 1"),
    "lora_rank": (at_least_1, "at least 1"),
    "learning_rate": (lambda x: 0 < x <= 1, "in (0, 1]"),
    "weight_decay": (lambda x: 0 <= x < float("inf"), "at least 0"),
    "max_grad_norm": (lambda x: 0 < x < float("inf"), "a positive number"),
    **{size: (at_least_1, "at least 1") for size in ("batch_size", "sample_batch_size", "train_batch_size",
       "samples_per_epoch", "grad_accum_steps", "num_inner_epochs", "train_steps", "num_epochs", "offline_size",
       "reward_model_steps")},
}  # fmt: skip


def check_args(args) -> None:
    """The checks of SHARED_FLAGS for each of them that `args` has; a script checks its own flags with `check`."""
    for name, (test, allowed) in SHARED_FLAGS.items():
        if hasattr(args, name):
            check(args, name, test(getattr(args, name)), allowed)


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
