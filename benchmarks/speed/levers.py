"""Performance levers switched on from outside a script, so that each can be measured before it goes into the six
scripts (where it would cost every reader a few lines). sd14_scale.py --levers runs scripts through this file.

    python benchmarks/speed/levers.py tf32,fused_adamw draft_k.py --train-steps 5 ...    # then draft_k.py's flags

tf32           TF32 tensor cores for fp32 matmuls and convolutions: the LoRA's fp32 matmuls and fp32 losses (bf16
               work is unaffected; on the CPU this changes nothing)
channels_last  the denoiser's and VAE's weights in channels-last memory format, so convolutions run NHWC
fused_adamw    torch.optim.AdamW(fused=True): one kernel for the whole LoRA update
cudnn_benchmark  cuDNN's autotuner picks each convolution's fastest algorithm for its shapes (among the deterministic
               ones while --torch-deterministic is on; on the CPU this changes nothing)
compile        torch.compile of the denoiser (nn.Module.compile, in place, once its LoRA is added)
"""

import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common import hooks  # noqa: E402
from common.cli import fail  # noqa: E402


def tf32() -> None:
    torch.set_float32_matmul_precision("high")  # convolutions: cuDNN already allows TF32 by default


def channels_last() -> None:
    def to_channels_last(model):
        model.denoiser.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)

    hooks.model_loaded.append(to_channels_last)


def fused_adamw() -> None:
    class FusedAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, fused=True, **kwargs)

    torch.optim.AdamW = FusedAdamW


def cudnn_benchmark() -> None:
    def benchmark(model):  # after the run has set cuDNN's deterministic mode from its flag
        torch.backends.cudnn.benchmark = True

    hooks.model_loaded.append(benchmark)


def compile_denoiser() -> None:
    hooks.lora_added.append(lambda model: model.denoiser.compile())


LEVERS = {"tf32": tf32, "channels_last": channels_last, "fused_adamw": fused_adamw, "cudnn_benchmark": cudnn_benchmark,
          "compile": compile_denoiser}  # fmt: skip


def apply(names: list[str]) -> None:
    """Switches the named levers on, in this process, before a script is run: through common/hooks.py, and for fused
    AdamW by replacing torch's class (the scripts look torch.optim.AdamW up when they build their optimizer)."""
    unknown = [name for name in names if name not in LEVERS]
    if unknown:
        fail(f"unknown lever(s) {', '.join(unknown)}; choose from: {', '.join(LEVERS)}")
    for name in names:
        LEVERS[name]()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        fail("usage: python benchmarks/speed/levers.py LEVER[,LEVER...] SCRIPT [the script's flags...]")
    apply([name for name in sys.argv[1].split(",") if name])
    script = sys.argv[2]
    if not os.path.isfile(os.path.join(ROOT, script)):
        fail(f"{script} is not a script of this repository (e.g. draft_k.py)")
    sys.argv = sys.argv[2:]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
