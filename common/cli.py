"""The command line and the errors a user can cause: `cli` parses a script's Args (presets, --resume's own flags, each
flag's allowed values as common/flags.py declares them), `fail` ends the program with one sentence, and
`install_error_handling` turns running out of memory, a lost torchrun process and Ctrl-C into one sentence too.
Nothing here runs when it is imported."""

import atexit
import contextlib
import dataclasses
import io
import logging
import os
import re
import signal
import sys
import threading
import warnings
from typing import NoReturn, TypeVar

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """End the program on a user error with one clear sentence and exit status 2 (no traceback). The sentence starts
    a line of its own, also under a progress bar, so that `grep '^error:'` finds it."""
    print(f"{end_progress_bar()}error: {message}", file=sys.stderr)
    raise SystemExit(2)


def end_progress_bar() -> str:
    """A newline if a progress bar (tqdm's, drawn on its line with carriage returns) is on the screen, else ""."""
    tqdm = sys.modules.get("tqdm.std")
    return "\n" if tqdm is not None and any(not bar.disable for bar in list(tqdm.tqdm._instances)) else ""


def check(args, name: str, ok: bool, allowed: str) -> None:
    """End the program with one sentence naming the flag, its value and what is allowed, unless `ok`."""
    if not ok:
        fail(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(args, name)!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Parsing a script's Args


def cli(args_class: type[T], presets: dict[str, dict]) -> T:
    """The script's arguments: `tyro.cli(args_class)` with the script's docstring atop `--help`, and defaults from the
    preset that `--preset NAME` names (the class's own defaults are the first preset's); flags given on the command
    line override the preset's values. With `--resume`, the defaults are the resumed run's own arguments: a flag
    declared Resumable may change (each change is reported), any other that differs ends the program with one
    sentence, and `args.resume` becomes the checkpoint folder. Every flag declared with Allowed values is checked; a
    value the parser cannot read ends in one sentence too. Installs the error handling (install_error_handling)."""
    from common.checkpoint import find_checkpoint
    from common.flags import Allowed, CanChangeOnResume, RunArgs, metadata

    install_error_handling()
    argv = sys.argv[1:]

    def given(flag: str) -> str | None:
        value = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")), None)
        return argv[argv.index(f"--{flag}") + 1] if f"--{flag}" in argv[:-1] else value

    name = given("preset") if given("preset") in presets else args_class.preset  # the parser refuses an unknown one
    defaults = dataclasses.replace(args_class(), preset=name, **with_paths_found(presets[name]))
    extras = metadata(args_class)
    if given("resume") is None or "--help" in argv or "-h" in argv:  # '--resume ""' is refused by find_checkpoint
        args = parse(args_class, defaults, presets)
    else:
        checkpoint_dir, state = find_checkpoint(given("resume"))
        script = os.path.basename(sys.argv[0])
        new_dir, old_dir = given("output-dir"), state.get("args", {}).get("output_dir")
        if new_dir and old_dir and os.path.abspath(new_dir) != os.path.abspath(old_dir):
            fail(
                f"--output-dir is {new_dir} but a resumed run continues in its own run folder under {old_dir}: leave"
                " --output-dir out"
            )
        if state.get("script", script) != script:
            fail(
                f"{checkpoint_dir} is a checkpoint of {state['script']}, not of {script}: resume it with"
                f" python {state['script']} --resume {given('resume')}"
            )
        saved = {k: v for k, v in state.get("args", {}).items() if k in extras}
        args = parse(args_class, dataclasses.replace(defaults, **saved), presets)
        for flag, old in saved.items():
            new, resumable = getattr(args, flag), any(isinstance(m, CanChangeOnResume) for m in extras[flag])
            if new != old and not resumable:
                option = f"--{flag.replace('_', '-')}"
                fail(f"{option} is {new} but {checkpoint_dir} was trained with {old}: resuming would mix two runs")
            if new != old and flag != "resume" and os.environ.get("RANK", "0") == "0":
                print(f"resuming with --{flag.replace('_', '-')} {new} (was {old})")
        args.resume = checkpoint_dir
    for flag, annotations in extras.items():
        for allowed in (m for m in annotations if isinstance(m, Allowed)):
            check(args, flag, allowed.test(getattr(args, flag)), allowed.what)
    if isinstance(args, RunArgs) and args.refused():
        fail(args.refused())
    return args


def with_paths_found(preset: dict) -> dict:
    """A preset's values, a relative path among them (the tiny model's folder) taken from the script's own folder
    when the working directory has no such path: --preset tiny works from any folder."""
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    found = {}
    for key, value in preset.items():
        beside_script = os.path.join(here, value) if isinstance(value, str) else ""
        use_script_folder = isinstance(value, str) and not os.path.exists(value) and os.path.exists(beside_script)
        found[key] = beside_script if use_script_folder else value
    return found


def parse(args_class: type[T], defaults: T, presets: dict[str, dict]) -> T:
    """tyro.cli, with the message of a value it cannot parse (an unknown choice, a word for a number, an unknown flag)
    turned from its box into one sentence. `--help` shows the chosen preset's values as the defaults, and says what
    each other preset sets."""
    import tyro

    description = sys.modules["__main__"].__doc__ or ""
    for name, values in presets.items():
        if values and name != defaults.preset:
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
            description += f"\n--preset {name} sets: {flags}\n"
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(args_class, default=defaults, description=description)
    except SystemExit as e:
        if not e.code:  # --help
            sys.stderr.write(captured.getvalue())
            raise
        text = []  # the box's first paragraph: below its title, up to its first rule
        for line in captured.getvalue().splitlines()[1:]:
            line = line.strip().strip("│|").strip()
            if set(line) <= set("─-+╰╯═ "):
                if text:
                    break
                continue
            text.append(line)
        fail(f"{' '.join(text).removeprefix('Error parsing ') or 'the command line cannot be parsed'} (see --help)")


# ----------------------------------------------------------------------------------------------------------------------
# Faults during a run, in one sentence


class Running:
    """The run folder of the run in progress, which Ctrl-C's sentence names (Run.start sets it)."""

    folder: str | None = None


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what `timeout`, Slurm, `docker stop` and a closed terminal send), raised where the program
    is, as Ctrl-C's KeyboardInterrupt is, so that it ends the same way."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop(signum, frame) -> None:
    raise Stopped(signum)


def where_to_resume() -> str:
    """ "; the last checkpoint is ... (--resume RUN)" for the run in progress (Running.folder), "; no checkpoint was
    written" when it has none yet, "" before a run folder exists: the end of a sentence that stops a run."""
    run_dir = Running.folder
    folder = os.path.join(run_dir or "", "checkpoints")
    names = sorted(n for n in os.listdir(folder) if ".tmp" not in n) if os.path.isdir(folder) else []
    if names:
        return f"; the last checkpoint is {os.path.join(folder, names[-1])} (--resume {run_dir})"
    return "; no checkpoint was written" if run_dir else ""


def on_exception(exc_type, exc, traceback) -> None:
    """sys.excepthook: running out of memory (CUDA or CPU) and a torchrun process that stopped answering end in one
    sentence and exit status 2 like the user errors; Ctrl-C, SIGTERM and SIGHUP in one line saying where the last
    checkpoint is (status 128 + the signal's number, as a shell reports it: 130 for Ctrl-C); anything else keeps
    Python's traceback."""
    if issubclass(exc_type, KeyboardInterrupt):
        where = where_to_resume()
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        what = f"stopped by {signal.Signals(signum).name}" if isinstance(exc, Stopped) else "interrupted"
        print(f"{end_progress_bar()}{what}{where}", file=sys.__stderr__)
        atexit._run_exitfuncs()
        os._exit(128 + signum)
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


def quiet_writer_thread(args) -> None:
    """threading.excepthook: TensorBoard's writer thread re-raises its write errors in the main thread (where the run
    names them in one sentence), so its own traceback is not printed; other threads keep theirs."""
    if type(args.thread).__name__ != "_AsyncWriterThread":
        threading.__excepthook__(args)


def install_error_handling() -> None:
    """What a script changes globally when it starts: out-of-memory errors and lost torchrun peers end in one sentence
    (sys.excepthook), and the libraries' warnings that say nothing about the run are filtered."""
    sys.excepthook = on_exception
    threading.excepthook = quiet_writer_thread
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, which on_exception reports
    for signum in (signal.SIGTERM, signal.SIGHUP):  # ended like Ctrl-C: the lock released, the checkpoint named
        signal.signal(signum, stop)
    # diffusers 0.42 still passes this retired argument to huggingface_hub, which warns on every config load
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    # transformers 5 warns on every run without torchvision that it uses its PIL image processors instead: the rewards
    # only read the processor's sizes and statistics, so the backend does not matter here
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision" not in record.getMessage()
    )


# ----------------------------------------------------------------------------------------------------------------------
# Files and downloads that cannot be read


def load_error(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words: an object that only an unrestricted load
    rebuilds (and that could run code from the file), or the file's damage."""
    message = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return (
            f"it holds {found.group(1)}, which only an unrestricted torch.load rebuilds and which could run code"
            " from the file: it is not loaded"
        )
    if "WeightsUnpickler error:" in message:  # not a pickle torch.save wrote: garbage or another format
        message = "not a file torch.save wrote: " + message.split("WeightsUnpickler error:")[1].strip()
    return (message.strip().splitlines() or [type(e).__name__])[0][:200]


def load_or_fail(load, model_id: str, **kwargs):
    """`load(model_id, **kwargs)` (a `from_pretrained` or `hf_hub_download`); a model that cannot be found or
    downloaded ends the run with one sentence saying which id failed and what to do."""
    try:
        return load(model_id, **kwargs)
    except Exception as e:  # not found, no network, a damaged or refused file, a config that does not fit its weights
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        part = f" (subfolder '{kwargs['subfolder']}')" if kwargs.get("subfolder") else ""
        if os.path.exists(model_id):  # a local folder or file: the network has nothing to do with it
            fail(f"could not load the local '{model_id}'{part}: a part is missing or damaged ({reason})")
        if not isinstance(e, OSError):  # huggingface_hub's not-found and connection errors are OSErrors
            fail(f"could not load '{model_id}'{part}: {type(e).__name__}: {reason}")
        fail(
            f"could not load '{model_id}'{part}: pass a local folder instead, check the network connection, or set"
            f" HF_HUB_OFFLINE=1 to use the local Hugging Face cache only ({reason})"
        )
