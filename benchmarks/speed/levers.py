"""Performance levers switched on from outside a script, so that each can be measured before it goes into the six
scripts (where it would cost every reader a few lines). sd14_scale.py --levers runs scripts through this file.

    python benchmarks/levers.py tf32,fused_adamw draft_k.py --train-steps 5 ...    # then draft_k.py's own flags

tf32           TF32 tensor cores for fp32 matmuls and convolutions: the LoRA's fp32 matmuls and fp32 losses (bf16
               work is unaffected; on the CPU this changes nothing)
channels_last  the UNet's and VAE's weights in channels-last memory format, so convolutions run NHWC
fused_adamw    torch.optim.AdamW(fused=True): one kernel for the whole LoRA update
compile        torch.compile of the UNet (nn.Module.compile, in place, once its LoRA is added)
"""

import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common.sd  # noqa: E402


def tf32() -> None:
    torch.set_float32_matmul_precision("high")  # convolutions: cuDNN already allows TF32 by default


def channels_last() -> None:
    load_sd = common.sd.load_sd

    def load_sd_channels_last(*args, **kwargs):
        sd = load_sd(*args, **kwargs)
        sd.unet.to(memory_format=torch.channels_last)
        sd.vae.to(memory_format=torch.channels_last)
        return sd

    common.sd.load_sd = load_sd_channels_last


def fused_adamw() -> None:
    class FusedAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, fused=True, **kwargs)

    torch.optim.AdamW = FusedAdamW


def compile_unet() -> None:
    add_lora = common.sd.add_lora

    def add_lora_and_compile(unet, *args, **kwargs):
        params = add_lora(unet, *args, **kwargs)
        unet.compile()
        return params

    common.sd.add_lora = add_lora_and_compile


LEVERS = {"tf32": tf32, "channels_last": channels_last, "fused_adamw": fused_adamw, "compile": compile_unet}


def apply(names: list[str]) -> None:
    """Switches the named levers on, in this process, before a script is run (the scripts import common.sd's
    functions and torch.optim.AdamW by name when they start, so they pick up the patched ones)."""
    unknown = [name for name in names if name not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {', '.join(unknown)}; choose from: {', '.join(LEVERS)}")
    for name in names:
        LEVERS[name]()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: python benchmarks/levers.py LEVER[,LEVER...] SCRIPT [script flags...]")
    apply([name for name in sys.argv[1].split(",") if name])
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
