"""Run folders and checkpoints (the storage of common/run.py's lifecycle). A checkpoint is a folder
`{run}/checkpoints/{step|epoch}_XXXXXX/` holding the LoRA in diffusers' format and `state.pt` (optimizer, counter,
RNG, the run's arguments). It is written into a temporary folder and renamed into place, so it exists whole or not
at all."""

import atexit
import json
import os
import shutil

import torch

from common import fail
from common.distributed import broadcast
from common.models import LORA_WEIGHTS

STATE = "state.pt"


def is_complete(checkpoint_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(checkpoint_dir, name)) for name in (STATE, LORA_WEIGHTS))


def say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(message)


def find_checkpoint(path: str) -> tuple[str, dict]:
    """`--resume PATH`: a checkpoint folder, or a run folder (its newest complete checkpoint). Returns the
    checkpoint folder and its state. A named checkpoint that cannot be read ends the run with one sentence; in a
    run folder, incomplete or unreadable checkpoints are skipped with a warning."""
    if os.path.isfile(os.path.join(path, STATE)):
        return path, load_state(path)
    folder = os.path.join(path, "checkpoints")
    names = sorted(os.listdir(folder), reverse=True) if os.path.isdir(folder) else []
    for name in names:
        checkpoint_dir = os.path.join(folder, name)
        if ".tmp" in name or not is_complete(checkpoint_dir):
            say(f"warning: skipping the incomplete checkpoint {checkpoint_dir}")
            continue
        try:
            state = torch.load(os.path.join(checkpoint_dir, STATE), weights_only=False)
        except Exception as e:  # a truncated or corrupt file: an older checkpoint may still be whole
            say(f"warning: skipping the unreadable checkpoint {checkpoint_dir} ({type(e).__name__})")
            continue
        say(f"resuming from {checkpoint_dir}")
        return checkpoint_dir, state
    fail(f"--resume {path} is neither a checkpoint folder nor a run folder with a complete checkpoint")


def load_state(checkpoint_dir: str) -> dict:
    try:
        return torch.load(os.path.join(checkpoint_dir, STATE), weights_only=False)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e)[:100]}"
        fail(f"the checkpoint {checkpoint_dir} cannot be read ({reason}); resume from an earlier one")


def run_dir_of(checkpoint_dir: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))


def open_run_dir(output_dir: str, run_name: str, resume_dir: str | None, state: dict | None, rank: int) -> str:
    """The run folder: the resumed run's (its metrics cut back to the checkpoint), or a new `output_dir/run_name`,
    suffixed if that exists, so that two runs never share one. Rank 0 creates it and locks it until the program ends:
    another process that opens the same run folder is refused. Unwritable output ends with one sentence."""
    run_dir = run_dir_of(resume_dir) if resume_dir else os.path.join(output_dir, run_name)
    if rank == 0:
        try:
            if not resume_dir:
                run_dir = new_folder(run_dir)
            os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
            lock(run_dir)
        except OSError as e:
            fail(f"cannot write the run folder {run_dir} ({e.strerror or e}): choose another --output-dir")
        if resume_dir:
            counter = "step" if "step" in state else "epoch"
            truncate_metrics(run_dir, counter, state[counter])
    return broadcast(run_dir)  # under torchrun, rank 0's


def new_folder(path: str) -> str:
    """Create `path`, or `path_2`, `path_3`, ... if it exists (two runs started in the same second)."""
    for i in range(1, 1000):
        candidate = path if i == 1 else f"{path}_{i}"
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            continue
    fail(f"{path} and 998 suffixed copies of it exist already: choose another --exp-name")


def lock(run_dir: str) -> None:
    """Hold `run_dir/.lock` (this process's id) until the program ends; refuse a folder a live process holds."""
    path = os.path.join(run_dir, ".lock")
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
        os.kill(pid, 0)  # raises if no such process: the lock is stale (a killed run)
        if pid != os.getpid():
            fail(f"the run folder {run_dir} is in use by process {pid}; wait for it to end or resume another run")
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    atexit.register(lambda: os.path.exists(path) and os.remove(path))


def truncate_metrics(run_dir: str, counter: str, last: int) -> None:
    """Drop what a run logged after its checkpoint `last`, so that the resumed run's lines follow on."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)[counter] <= last]
    with open(path, "w") as f:
        f.writelines(kept)


def save_checkpoint(checkpoint_dir: str, model, state: dict) -> None:
    """The LoRA and `state` into a temporary folder, then renamed to `checkpoint_dir` (replacing an older one of the
    same name, which a resumed run may have left beyond its checkpoint). A failed write (a full disk) leaves the
    earlier checkpoints as they were and ends the program with one sentence."""
    temporary = f"{checkpoint_dir}.tmp"
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        model.save_lora(temporary)  # refuses non-finite weights
        torch.save(state, os.path.join(temporary, STATE))
        if os.path.exists(checkpoint_dir):
            shutil.rmtree(checkpoint_dir)
        os.replace(temporary, checkpoint_dir)
    except OSError as e:
        shutil.rmtree(temporary, ignore_errors=True)
        fail(f"could not write the checkpoint {checkpoint_dir} ({e.strerror or e}); the earlier checkpoints are intact")
