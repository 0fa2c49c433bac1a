"""Every command the documentation gives works as written (README.md, docs/*.md, assets/README.md).

The commands are read from the pages themselves: each line of a ```bash block, each inline `python ...` or
`torchrun ...`, and each ```python block. Each is checked by its kind:
    a CPU run on the shipped tiny model (--preset tiny)   run for real, in a temporary folder (slow tier)
    a run that needs a GPU or a download (SD 1.4, hub ids) parsed by the script's own command line and its checks,
                                                          up to where the run would start (fast tier)
    training the tiny model (27 min), the reward server   parsed by its command line (fast tier)
    set-up (pip) and test (pytest) commands               checked against the files and markers they name
    a ```python block                                     run (slow tier)
A command of no known kind fails, so that a new command in the docs is never unchecked. The benchmarks' own commands
(docs/BENCHMARKS.md, and any block that runs a benchmarks/ script) are left to tests/test_benchmarks.py. The links
between the pages, and the files they link, are checked too."""

import dataclasses
import glob
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import common.run
from scripts import ROOT, SCRIPTS

PAGES = ["README.md", "assets/README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
BENCHMARKS_PAGE = "docs/BENCHMARKS.md"
PARSED_ONLY = ("assets/train_tiny_sd.py", "assets/train_tiny_sd3.py", "reward_server.py")


def read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def commands(page: str) -> list[str]:
    """The shell commands a page gives: the lines of its ```bash blocks (comments and continuations joined), and
    inline `python ...` / `torchrun ...` spans and lines outside the blocks (an indented command, say)."""
    text, found = read(page), []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if lang in ("bash", "sh", "shell", "console"):
            lines = body.replace("\\\n", " ").splitlines()
            found += [line.split(" #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    found += [" ".join(span.split()) for span in re.findall(r"`((?:python|torchrun) [^`]+)`", prose)]
    found += [line.strip() for line in prose.splitlines() if re.match(r"\s*(python|torchrun) ", line)]
    return found


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", read(page), re.M | re.S)


def is_benchmarks(page: str, command: str) -> bool:
    """docs/BENCHMARKS.md, or a command in a block that runs a benchmarks/ script (with its set-up: a clone, wheels)."""
    if page == BENCHMARKS_PAGE or "benchmarks/" in command:
        return True
    blocks = re.findall(r"^```\w*\n(.*?)^```", read(page), re.M | re.S)
    return any(command in block and "benchmarks/" in block for block in blocks)


def kind(command: str) -> tuple[str, list[str]]:
    """(kind, argv): the command's kind and its words, the program's environment variables dropped."""
    argv = shlex.split(command)
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        argv = argv[1:]
    if argv[:2] == ["pip", "install"]:
        return "setup", argv
    if argv[:3] == ["python", "-m", "pytest"]:
        return "tests", argv
    if argv[0] == "torchrun":  # one process per GPU: parsed
        script = next(i for i, word in enumerate(argv) if word.endswith(".py"))
        return ("gpu" if argv[script] in SCRIPTS else "unknown"), argv[script:]
    if argv[0] == "python" and len(argv) > 1 and argv[1] in SCRIPTS:
        tiny = "--preset tiny" in command or "--preset=tiny" in command
        return ("tiny" if tiny else "gpu"), argv[1:]
    if argv[0] == "python" and len(argv) > 1 and argv[1] in PARSED_ONLY:
        return "parsed", argv[1:]
    return "unknown", argv


DOC_COMMANDS = sorted({(page, c) for page in PAGES for c in commands(page) if not is_benchmarks(page, c)})
BY_KIND = {k: sorted({c for _, c in DOC_COMMANDS if kind(c)[0] == k}) for k in ("tiny", "gpu", "parsed")}


def test_every_documented_command_has_a_known_kind():
    assert len(DOC_COMMANDS) > 20 and BY_KIND["tiny"] and BY_KIND["gpu"]  # the extraction finds them
    unknown = [f"{page}: {command}" for page, command in DOC_COMMANDS if kind(command)[0] == "unknown"]
    assert not unknown, "commands no test checks (add their kind to tests/test_docs.py):\n" + "\n".join(unknown)


def test_the_readme_sets_up_runs_and_tests_in_five_commands():
    """On a fresh machine: two set-up commands, one real fine-tuning run on the CPU, the two test tiers."""
    block = re.search(r"^## Get started\n.*?^```bash\n(.*?)^```", read("README.md"), re.M | re.S).group(1)
    kinds = [kind(command)[0] for command in commands_in(block)]
    assert kinds == ["setup", "setup", "tiny", "tests", "tests"], kinds


def commands_in(block: str) -> list[str]:
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("command", sorted({c for _, c in DOC_COMMANDS if kind(c)[0] == "setup"}))
def test_setup_commands_name_the_requirements(command):
    """`pip install -r FILE` names a file that exists; a pinned torch is requirements.txt's version."""
    argv = kind(command)[1]
    pins = dict(line.split("==") for line in read("requirements.txt").splitlines() if "==" in line)
    for i, word in enumerate(argv):
        if word == "-r":
            assert os.path.isfile(os.path.join(ROOT, argv[i + 1])), argv[i + 1]
        if "==" in word:
            name, version = word.split("==")
            assert pins.get(name) == version, f"{word}: requirements.txt pins {name}=={pins.get(name)}"


@pytest.mark.parametrize("command", sorted({c for _, c in DOC_COMMANDS if kind(c)[0] == "tests"}))
def test_test_commands_name_the_tests_and_registered_markers(command):
    options = kind(command)[1][3:]  # after python -m pytest
    paths = [word for i, word in enumerate(options) if not word.startswith("-") and options[i - 1 : i] != ["-m"]]
    assert paths and all(os.path.exists(os.path.join(ROOT, path)) for path in paths), paths
    markers = re.search(r"^markers = \[(.*?)\]", read("pyproject.toml"), re.M | re.S).group(1)  # no tomllib in 3.10
    registered = set(re.findall(r'"(\w+):', markers))
    if "-m" in options:
        names = set(re.findall(r"\w+", options[options.index("-m") + 1])) - {"not", "and", "or"}
        assert names <= registered, f"{names - registered} are not markers registered in pyproject.toml"
        marked = "".join(read(os.path.relpath(p, ROOT)) for p in glob.glob(f"{ROOT}/tests/test_*.py"))
        assert all(f"pytest.mark.{name}" in marked for name in names), "a tier that selects nothing"


# ---------------------------------------------------------------------------------------------------------------------
# Commands that need a GPU or a download: the script's own command line and checks, up to where its run would start


class RunWouldStart(Exception):
    pass


def parse_as_the_script(script: str, argv: list[str], tmp_path, monkeypatch, capsys):
    """Runs `python script argv` in this process up to its `Run(args, ...)`, the first thing that touches a device
    or a model: every flag has been parsed by `cli(Args, PRESETS)` and checked by the script by then. Files a user
    brings (`--prompt-file`, `--offline-data`) are stood in for; `runs/<run>` is a run folder with a checkpoint of
    this script."""
    monkeypatch.chdir(tmp_path)  # nothing lands in the checkout
    if "--prompt-file" in argv:
        (tmp_path / argv[argv.index("--prompt-file") + 1]).write_text("a cat\na dog\n")
    if "--offline-data" in argv:  # braid.py reads its data before anything loads: 12 scored images
        folder = tmp_path / argv[argv.index("--offline-data") + 1]
        folder.mkdir()
        for i in range(12):
            Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / "scores.csv").write_text("file,score\n" + "".join(f"{i}.png,{i}\n" for i in range(12)))
    if "runs/<run>" in argv:
        argv = [word.replace("<run>", "a_run") for word in argv]
        fake_run(script, tmp_path / "runs" / "a_run")
    assert not any("<" in word for word in argv), f"a placeholder this test cannot fill: {argv}"

    def reached(args, *_, **__):
        raise RunWouldStart(args)

    monkeypatch.setattr(common.run, "Run", reached)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # cli installs its own
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except RunWouldStart as e:
        return e.args[0]
    except SystemExit as e:
        pytest.fail(f"python {script} {shlex.join(argv)} ended with exit status {e.code}: {capsys.readouterr().err}")
    pytest.fail(f"python {script} {shlex.join(argv)} ended before its run started")


def fake_run(script: str, run_dir) -> None:
    """A run folder whose checkpoint holds `script`'s default arguments: what --resume reads before anything loads."""
    args = runpy.run_path(os.path.join(ROOT, script))["Args"]()
    counter = "epoch" if script in ("ddpo.py", "rwr.py") else "step"
    checkpoint = run_dir / "checkpoints" / f"{counter}_000001"
    checkpoint.mkdir(parents=True)
    state = {"script": script, counter: 1, "args": dataclasses.asdict(args), "rng": torch.Generator().get_state(),
             "optimizer": {"state": {}, "param_groups": []}}  # fmt: skip
    torch.save(state, checkpoint / "state.pt")
    save_file({"lora": torch.zeros(1)}, checkpoint / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("command", BY_KIND["gpu"])
def test_gpu_command_parses(command, tmp_path, monkeypatch, capsys):
    script, *argv = kind(command)[1]
    args = parse_as_the_script(script, argv, tmp_path, monkeypatch, capsys)
    assert args.preset == "sd14" or args.resume, "a --preset tiny command belongs to the runs below"


@pytest.mark.parametrize("command", BY_KIND["parsed"])
def test_training_the_tiny_model_and_serving_a_reward_parse(command):
    """Half an hour of training that writes over assets/tiny-sd or tiny-sd3, and a server that runs until stopped:
    parsed only (tests/test_tiny_sd.py, test_tiny_sd3.py and test_remote.py check what they do)."""
    import tyro

    train_args = runpy.run_path(os.path.join(ROOT, kind(command)[1][0]))["Args"]
    try:
        tyro.cli(train_args, args=kind(command)[1][1:])
    except SystemExit as e:
        pytest.fail(f"{command} ended with exit status {e.code}")


# ---------------------------------------------------------------------------------------------------------------------
# CPU runs on the shipped tiny model: for real, exactly as written


def scratch_checkout(tmp_path):
    """A folder that looks like the checkout (its scripts, common/ and assets/, linked), so that a command run there
    finds `assets/tiny-sd` and writes its runs/ there."""
    for name in [*SCRIPTS, "common", "assets", "examples"]:
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


# appended to a documented --preset tiny command: the run as written, cut to one step (epoch), so that the dozen of
# them take seconds each rather than minutes (the full runs are the learning tests' and the method pages' numbers)
SHORTER = {"ddpo.py": ["--num-epochs", "1"], "rwr.py": ["--num-epochs", "1"],
           "braid.py": ["--train-steps", "1", "--offline-size", "24", "--reward-model-steps", "20"]}  # fmt: skip


def run_for_real(commands: list[str]) -> list[str]:
    """The tiny commands run for real: each script's first, and any that brings its own model or reward. The others
    differ from one of those by a method's flags (BRAID's --c and --conservatism, DDPO's --estimator, RWR's --beta and
    --sparse), whose runs the methods' tests make (test_braid.py, test_ddpo_rwr.py): they are parsed by the script."""
    real, scripts = [], set()
    for command in commands:
        script, *argv = kind(command)[1]
        if script not in scripts or {"--pretrained-model", "--reward"} & set(argv):
            real.append(command)
        scripts.add(script)
    return real


@pytest.mark.parametrize("command", sorted(set(BY_KIND["tiny"]) - set(run_for_real(BY_KIND["tiny"]))))
def test_tiny_command_variant_parses(command, tmp_path, monkeypatch, capsys):
    script, *argv = kind(command)[1]
    assert parse_as_the_script(script, argv, tmp_path, monkeypatch, capsys).preset == "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("command", run_for_real(BY_KIND["tiny"]))
def test_tiny_command_runs(command, tmp_path):
    argv = shlex.split(command)
    argv += SHORTER.get(argv[1], ["--train-steps", "1"])
    cwd = scratch_checkout(tmp_path)
    result = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = os.listdir(cwd / "runs")
    assert os.path.isfile(cwd / "runs" / run / "pytorch_lora_weights.safetensors")
    assert f"LoRA: runs/{run}/pytorch_lora_weights.safetensors" in result.stdout
    # tiny-sd's held-out prompts: the pretrained model's samples follow them (what eval_fidelity measures; tiny-sd3's
    # shapes are blobs, assets/README.md)
    fidelity = re.search(r"follow their prompt: ([\d.]+) at the start", result.stdout)
    if not {"--prompt-file", "--validation-prompts", "--prompts"} & set(argv) and "assets/tiny-sd3" not in argv:
        assert fidelity and float(fidelity.group(1)) >= 0.9, result.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in PAGES if python_blocks(page)])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(scratch_checkout(tmp_path))
    for block in python_blocks(page):
        exec(compile(block, page, "exec"), {"__name__": "docs"})


# ---------------------------------------------------------------------------------------------------------------------
# Links


def anchors(page: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", read(page), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES)
def test_links_point_into_the_repository(page):
    """Every relative link and image names a file of the repository, and an anchor names a heading of it."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
        if re.match(r"https?://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, linked)):
            broken.append(f"{target}: no such file")
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, broken
