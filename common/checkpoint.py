"""Run folders and checkpoints (the storage of common/run.py's lifecycle). A checkpoint is a folder
`{run}/checkpoints/{step|epoch}_XXXXXX/` holding the LoRA in diffusers' format and `state.pt` (optimizer, counter,
RNG, the run's arguments and script). It is written into a temporary folder and renamed into place, so it exists
whole or not at all. state.pt is read with torch.load(weights_only=True): tensors, numbers, strings, lists and
dicts only, so a file from elsewhere cannot run code when it is loaded."""

import atexit
import fcntl
import json
import os
import shutil

import torch

from common.cli import fail, load_error
from common.distributed import broadcast
from common.lora import LORA_WEIGHTS

STATE = "state.pt"
STATE_KEYS = ("optimizer", "rng", "args")  # and the counter, "step" or "epoch"


def is_complete(checkpoint_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(checkpoint_dir, name)) for name in (STATE, LORA_WEIGHTS))


def say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(message)


def why(e: BaseException, path: str | None = None) -> str:
    """The cause of a failed read or write in a few words: the OS's reason where it gave one; for a write that
    torch or a library reports without one, a full disk or a file-size limit (ulimit -f) when either is the case."""
    cause = getattr(e, "strerror", None) or (e.__cause__ and getattr(e.__cause__, "strerror", None))
    if cause:
        return cause
    if path:
        import resource

        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        if shutil.disk_usage(folder).free < 2**20:
            return "No space left on device"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            return f"File too large: the file-size limit (ulimit -f) is {limit} bytes"
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]}"


def find_checkpoint(path: str) -> tuple[str, dict]:
    """`--resume PATH`: a checkpoint folder inside a run folder's checkpoints/, or a run folder (its newest complete
    checkpoint). Returns the checkpoint folder and its state. A named checkpoint that cannot be read ends the run with
    one sentence; in a run folder, incomplete or unreadable checkpoints are skipped with a warning."""
    if not path.strip():
        fail("--resume needs a run folder (runs/...) or one of its checkpoint folders, got an empty path")
    if os.path.isfile(os.path.join(path, STATE)):
        if os.path.basename(os.path.dirname(os.path.abspath(path))) != "checkpoints":
            fail(
                f"--resume {path} is a checkpoint outside a run folder's checkpoints/: a resumed run continues in its"
                " own run folder, so resume the run folder it came from"
            )
        return path, load_state(path)
    folder = os.path.join(path, "checkpoints")
    names = sorted(os.listdir(folder), reverse=True) if os.path.isdir(folder) else []
    for name in names:
        checkpoint_dir = os.path.join(folder, name)
        if ".tmp" in name or not is_complete(checkpoint_dir):
            say(f"warning: skipping the incomplete checkpoint {checkpoint_dir}")
            continue
        try:
            state = read_state(checkpoint_dir)
            readable_lora(checkpoint_dir)
        except Exception as e:  # a truncated or corrupt file: an older checkpoint may still be whole
            say(f"warning: skipping the unreadable checkpoint {checkpoint_dir} ({load_error(e)})")
            continue
        say(f"resuming from {checkpoint_dir}")
        return checkpoint_dir, state
    fail(f"--resume {path} is neither a checkpoint folder nor a run folder with a complete checkpoint")


def read_state(checkpoint_dir: str) -> dict:
    """state.pt, loaded without running any code from it, with the keys a resume needs, each of the kind it must be
    (else ValueError, naming the first that is not)."""
    state = torch.load(os.path.join(checkpoint_dir, STATE), weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a dict")
    missing = [key for key in STATE_KEYS if key not in state] + ([] if {"step", "epoch"} & set(state) else ["step"])
    if missing:
        raise ValueError(f"it has no '{missing[0]}'")
    counter = "step" if "step" in state else "epoch"
    kinds = {  # key: (what it must be, whether a value is that)
        counter: ("a count", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0),
        "rng": (
            "a uint8 tensor (a generator's state)",
            lambda x: isinstance(x, torch.Tensor) and x.dtype == torch.uint8,
        ),
        "args": ("a dict of the run's flags", lambda x: isinstance(x, dict)),
        "optimizer": (
            "an optimizer's state_dict",
            lambda x: (
                isinstance(x, dict) and isinstance(x.get("state"), dict) and isinstance(x.get("param_groups"), list)
            ),
        ),
    }
    for key, (kind, ok) in kinds.items():
        if not ok(state[key]):
            raise ValueError(f"its '{key}' is a {type(state[key]).__name__}, not {kind}")
    return state


def readable_lora(checkpoint_dir: str) -> None:
    """Raises if the checkpoint's LoRA file is not a readable safetensors file (its header is parsed, not its data)."""
    from safetensors import safe_open

    with safe_open(os.path.join(checkpoint_dir, LORA_WEIGHTS), framework="pt") as f:
        f.keys()


def load_state(checkpoint_dir: str) -> dict:
    try:
        return read_state(checkpoint_dir)
    except Exception as e:
        fail(f"the checkpoint {checkpoint_dir} cannot be read ({load_error(e)}); resume from an earlier one")


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
            if resume_dir:
                counter = "step" if "step" in state else "epoch"
                truncate_metrics(run_dir, counter, state[counter])
        except OSError as e:
            fail(f"cannot write the run folder {run_dir} ({why(e)}): choose another --output-dir")
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


def process_start(pid: int) -> str:
    """When process `pid` started (Linux: field 22 of /proc/PID/stat), or "" where that cannot be read: with the id,
    it tells a live run from a process that was given a dead run's id."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


HELD = {}  # the run folders this process has locked: the lock file's path -> its open file (the lock lasts while open)


def lock(run_dir: str) -> None:
    """Hold `run_dir/.lock` until the program ends, or refuse the folder with one sentence if another process holds
    it. The lock is the OS's (flock on the open file), so two processes started at the same instant cannot both take
    it, and a killed run's is released with its process; the file says who holds it (this process's id and start)."""
    path = os.path.realpath(os.path.join(run_dir, ".lock"))
    if path in HELD:  # this process holds it already (a run resumed in the same process)
        return
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = (f.read().split() or ["another process"])[0]
            f.close()
            fail(f"the run folder {run_dir} is in use by process {holder}; wait for it to end or resume another run")
        try:  # the file may have been removed by a run that just ended: lock the one now at the path instead
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {process_start(os.getpid())}")
    f.flush()
    HELD[path] = f
    atexit.register(release, path)


def release(path: str) -> None:
    """Remove the lock file and let the lock go (at exit)."""
    f = HELD.pop(path, None)
    if f is not None:
        if os.path.exists(path):
            os.remove(path)
        f.close()


def truncate_metrics(run_dir: str, counter: str, last: int) -> None:
    """Drop what a run logged after its checkpoint `last`, so that the resumed run's lines follow on; a last line
    that a killed run left half-written is dropped too."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn by a kill mid-write
            fail(f"{path}, line {number}, is not JSON: the run folder's log is damaged; resume another run")
        if entry.get(counter, last + 1) <= last:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(kept)


def save_checkpoint(checkpoint_dir: str, model, state: dict) -> None:
    """The LoRA and `state` into a temporary folder, then renamed to `checkpoint_dir` (replacing an older one of the
    same name, which a resumed run may have left beyond its checkpoint). A failed write (a full disk, a file-size
    limit) removes the partial folder, leaves the earlier checkpoints as they were and ends the program with one
    sentence."""
    temporary = f"{checkpoint_dir}.tmp"
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        model.save_lora(temporary)  # refuses non-finite weights
        torch.save(state, os.path.join(temporary, STATE))
        if os.path.exists(checkpoint_dir):
            shutil.rmtree(checkpoint_dir)
        os.replace(temporary, checkpoint_dir)
    except Exception as e:  # torch.save reports a failed write as a RuntimeError, safetensors as its own error
        shutil.rmtree(temporary, ignore_errors=True)
        fail(
            f"could not write the checkpoint {checkpoint_dir} ({why(e, temporary)}); the earlier checkpoints are intact"
        )
