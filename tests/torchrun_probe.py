"""`torchrun ... tests/torchrun_probe.py OUT script.py ARGS`: runs the script as torchrun would, then saves this
rank's LoRA parameters to OUT/rank{RANK}.pt, so that a test can compare the ranks' weights."""

import os
import runpy
import sys

import torch

out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
script_globals = runpy.run_path(script, run_name="__main__")
torch.save([p.detach().cpu() for p in script_globals["lora_params"]], os.path.join(out, f"rank{os.environ['RANK']}.pt"))
