"""`--mixed-precision bf16` on the CPU: the dtype path every GPU run takes by default (frozen UNet, VAE and text
encoder in bf16, the LoRA and its optimiser in fp32, the DDIM arithmetic and the rewards in fp32), run for each script
in CI, where there is no GPU."""

import math

import pytest
import torch

import common.sd
from scripts import BRAID_TINY, DRAFT_TINY, EPOCHS_TINY, read_metrics, run_script

# one or two updates each: enough to run every cast of a training step and of the evaluation
CASES = {
    "draft_full.py": [*DRAFT_TINY, "--train-steps", "2"],
    "draft_k.py": [*DRAFT_TINY, "--train-steps", "2", "--k", "2"],
    "draft_lv.py": [*DRAFT_TINY, "--train-steps", "2"],
    "ddpo.py": [*EPOCHS_TINY, "--num-epochs", "1"],
    "rwr.py": [*EPOCHS_TINY, "--num-epochs", "1"],
    "braid.py": [*BRAID_TINY, "--train-steps", "2", "--k", "2", "--offline-size", "12", "--reward-model-steps", "5"],
}


@pytest.mark.parametrize("script", CASES)
def test_bf16_on_the_cpu_trains_an_fp32_lora_on_bf16_frozen_weights(script, tiny_sd_path, tmp_path, monkeypatch):
    initial_lora, add_lora = [], common.sd.add_lora

    def recording_add_lora(*args, **kwargs):
        params = add_lora(*args, **kwargs)
        initial_lora.extend(p.detach().clone() for p in params)
        return params

    monkeypatch.setattr(common.sd, "add_lora", recording_add_lora)
    args = ["--pretrained-model", tiny_sd_path, *CASES[script], "--mixed-precision", "bf16", "--output-dir",
            str(tmp_path)]  # fmt: skip
    script_globals = run_script(script, args, monkeypatch)
    _, metrics = read_metrics(tmp_path)
    assert metrics and all(math.isfinite(v) for m in metrics for v in m.values() if v is not None), metrics
    sd, lora_params = script_globals["sd"], script_globals["lora_params"]
    for module in (sd.unet, sd.vae, sd.text_encoder):
        frozen_dtypes = {p.dtype for p in module.parameters() if not p.requires_grad}
        assert frozen_dtypes == {torch.bfloat16}, (type(module).__name__, frozen_dtypes)
    assert {p.dtype for p in lora_params} == {torch.float32}
    assert len(initial_lora) == len(lora_params)
    assert all(not torch.equal(before, after) for before, after in zip(initial_lora, lora_params))  # every one moved
