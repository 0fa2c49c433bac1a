"""A script copied into another project: ddpo.py and draft_k.py with common/ (what the README says to copy), in a
folder outside this repository, each run for one step there as `python script.py ...`."""

import os
import shutil
import subprocess
import sys

import pytest

from scripts import ROOT, TINY


@pytest.mark.slow
def test_a_copied_script_runs_outside_the_repository(tiny_sd_path, tmp_path):
    project = tmp_path / "my_project"
    shutil.copytree(os.path.join(ROOT, "common"), project / "common", ignore=shutil.ignore_patterns("__pycache__"))
    for script in ("ddpo.py", "draft_k.py"):
        shutil.copy(os.path.join(ROOT, script), project / script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the repository on the path
    for script, length in (("ddpo.py", "--num-epochs"), ("draft_k.py", "--train-steps")):
        command = [sys.executable, script, "--pretrained-model", tiny_sd_path, *TINY[script], length, "1"]
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = [d for d in (project / "runs").iterdir() if script[:-3] in d.name]
        assert (run_dir / "pytorch_lora_weights.safetensors").is_file() and (run_dir / "README.md").is_file()
    where = subprocess.run([sys.executable, "-c", "import common; print(common.__file__)"], cwd=project, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert where.stdout.strip() == str(project / "common" / "__init__.py")  # the copy, not this repository's
