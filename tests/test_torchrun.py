"""torchrun: two CPU processes (gloo) of batch B end with identical LoRA weights, equal to those of one process of
batch 2B: every rank draws the global batch and keeps its slice, and the LoRA gradients are averaged each update."""

import os
import subprocess
import sys

import pytest
import torch

from scripts import ROOT, read_metrics, run_script

DRAFT = ["--reward", "colorfulness", "--train-steps", "2", "--learning-rate", "1e-3"]
EPOCHS = ["--reward", "colorfulness", "--num-epochs", "2", "--learning-rate", "1e-3"]
BRAID = ["--labeler", "colorfulness", "--feature-model", "vae", "--offline-size", "24", "--reward-model-steps", "20",
         "--train-steps", "2", "--k", "2"]  # fmt: skip
# (arguments, the per-process batch flags at batch B; one process gets them doubled); continuous rewards only: a
# JPEG size can jump by a byte on a rounding difference
CASES = {
    "draft_full.py": (DRAFT, {"--batch-size": 1}),
    "draft_k.py": (DRAFT + ["--k", "3", "--k-min", "1"], {"--batch-size": 1}),  # K drawn per trajectory
    "draft_lv.py": (DRAFT, {"--batch-size": 1}),
    # one training batch per epoch: the same update whatever the split (minibatches would differ)
    "ddpo.py": (EPOCHS, {"--samples-per-epoch": 4, "--sample-batch-size": 2, "--train-batch-size": 4}),
    "rwr.py": (EPOCHS, {"--samples-per-epoch": 4, "--sample-batch-size": 2, "--train-batch-size": 4}),
    "braid.py": (BRAID, {"--batch-size": 2}),
}


def batch_flags(flags: dict, scale: int) -> list[str]:
    return [str(x) for name, value in flags.items() for x in (name, value * scale)]


@pytest.mark.slow
@pytest.mark.parametrize("script, family", [*((s, "sd") for s in CASES), ("ddpo.py", "sd3"), ("draft_k.py", "flux")])
def test_two_ranks_match_one_process_over_the_combined_batch(script, family, request, tmp_path, monkeypatch):
    """Every script on SD 1.x; DDPO on SD 3 too (a flow, whose last step is not trained: ranks agree on which), and
    DRaFT-K on FLUX.1-dev (packed latents, its guidance input)."""
    path = request.getfixturevalue({"sd": "tiny_sd_path", "sd3": "tiny_sd3_path", "flux": "tiny_flux_path"}[family])
    args, flags = CASES[script]
    args = [*args, "--pretrained-model", path, "--resolution", "16", "--num-steps", "4", "--save-every", "1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "tests", "torchrun_probe.py"), str(tmp_path), script]  # fmt: skip
    result = subprocess.run([*command, *args, *batch_flags(flags, 1), "--output-dir", str(tmp_path / "two")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))  # the ranks took exactly the same steps

    run_dir, metrics = read_metrics(tmp_path / "two")  # one run folder, written by rank 0
    assert [m.get("step", m.get("epoch")) for m in metrics] == [1, 2]
    assert os.listdir(os.path.join(run_dir, "checkpoints"))
    counter = "epoch" if "--num-epochs" in args else "step"
    assert os.path.isfile(os.path.join(run_dir, "samples", f"{counter}_000002.png"))

    one = run_script(script, [*args, *batch_flags(flags, 2), "--output-dir", str(tmp_path / "one")], monkeypatch)
    _, single = read_metrics(tmp_path / "one")
    for a, b in zip(metrics, single):  # the grad norm would double if the ranks' gradients were summed
        for key in ("reward_mean", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (key, a, b)  # DDPO's loss is ~0
    # Adam steps by about lr * sign(g), so rounding in a near-zero gradient entry can move it by a fraction of lr
    for a, b in zip(rank0, one["lora_params"]):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4)
