"""Running the six scripts from tests: in this process (fast) or as `python script.py ...` (the real thing)."""

import json
import os
import runpy
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["draft_full.py", "draft_k.py", "draft_lv.py", "ddpo.py", "rwr.py", "braid.py"]
# each script at tiny sizes, for the random tiny pipeline of conftest.py (add --pretrained-model)
DRAFT_TINY = ["--reward", "colorfulness", "--resolution", "16", "--num-steps", "4", "--batch-size", "2"]
EPOCHS_TINY = ["--reward", "jpeg_incompressibility", "--resolution", "16", "--num-steps", "4",
               "--samples-per-epoch", "4", "--sample-batch-size", "2", "--train-batch-size", "2"]  # fmt: skip
BRAID_TINY = ["--labeler", "colorfulness", "--feature-model", "vae", "--resolution", "16", "--num-steps", "4",
              "--offline-size", "24", "--batch-size", "4", "--reward-model-steps", "50"]  # fmt: skip
TINY = {"draft_full.py": DRAFT_TINY, "draft_k.py": DRAFT_TINY, "draft_lv.py": DRAFT_TINY, "ddpo.py": EPOCHS_TINY,
        "rwr.py": EPOCHS_TINY, "braid.py": BRAID_TINY}  # fmt: skip
LENGTH = {script: "--num-epochs" if script in ("ddpo.py", "rwr.py") else "--train-steps" for script in SCRIPTS}


def definitions(script: str) -> dict:
    """The script's functions and classes, without running its training (that sits under __main__)."""
    return runpy.run_path(os.path.join(ROOT, script))


def run_script(script: str, args: list[str], monkeypatch) -> dict:
    """Runs a script in this process, as `python script ...` would, without the interpreter's start-up cost;
    returns the script's globals at its end."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.chdir(ROOT)  # as `python script ...` from the repository (--preset tiny's model path is relative)
    return runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


def run_subprocess(script: str, args: list[str]) -> str:
    """Runs `python script args` to the end; returns what it printed on stderr (progress bars, notes, warnings)."""
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def tensorboard_images(run_dir: str) -> list[int]:
    """The steps at which the run's TensorBoard events hold a sample grid."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"images": 0})
    events.Reload()
    return [image.step for image in events.Images("samples")]


def read_metrics(output_dir) -> tuple[str, list[dict]]:
    """The only run folder under output_dir, and its metrics.jsonl."""
    (run,) = os.listdir(output_dir)
    with open(os.path.join(output_dir, run, "metrics.jsonl")) as f:
        return os.path.join(output_dir, run), [json.loads(line) for line in f]


def check_resume(script: str, args: list[str], length: str, tmp_path, monkeypatch, keys=("reward_mean", "loss")):
    """Runs 4 steps (or epochs: `length` names the flag) in one go, then 2, then resumes from that run folder to
    4, and checks that the resumed run logs the uninterrupted run's numbers."""
    args = [*args, "--save-every", "2", "--sample-every", "100"]
    run_script(script, [*args, length, "4", "--output-dir", str(tmp_path / "once")], monkeypatch)
    _, uninterrupted = read_metrics(tmp_path / "once")
    run_script(script, [*args, length, "2", "--output-dir", str(tmp_path / "twice")], monkeypatch)
    stopped_dir, _ = read_metrics(tmp_path / "twice")
    run_script(
        script, [*args, length, "4", "--output-dir", str(tmp_path / "twice"), "--resume", stopped_dir], monkeypatch
    )
    _, resumed = read_metrics(tmp_path / "twice")
    counter = "epoch" if length == "--num-epochs" else "step"
    assert [m[counter] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, resumed):
        for key in keys:
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]) + 1e-7, (a[counter], key, a[key], b[key])
