"""The plumbing shared by the six scripts: the `TRY NOT TO MODIFY` blocks are the same text in every script,
presets, and common/checkpoint.py (atomic checkpoints, resuming from the newest complete one)."""

import os
import re
import sys

import pytest
import torch

from common import cli
from common.checkpoint import find_checkpoint, save_checkpoint, truncate_metrics
from common.sd import add_lora, load_sd
from scripts import ROOT, SCRIPTS, definitions

# the only differences allowed: DDPO and RWR count epochs (--num-epochs) where the others count steps (--train-steps),
# and DDPO's checkpoint also holds its per-prompt reward buffers
ALLOWED = [
    (r"args\.num_epochs", "args.train_steps"),
    (r"epoch", "step"),
    (r", \"prompt_buffers\": tracker.buffers", ""),
]


def plumbing_blocks(script: str) -> list[str]:
    """Each `# TRY NOT TO MODIFY` block of a script: from its banner to the next blank line."""
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    blocks = re.findall(r"^ *# TRY NOT TO MODIFY.*?(?=\n\n|\Z)", text, flags=re.MULTILINE | re.DOTALL)
    for pattern, replacement in ALLOWED:
        blocks = [re.sub(pattern, replacement, block) for block in blocks]
    return blocks


def test_the_plumbing_blocks_are_the_same_in_every_script():
    reference = plumbing_blocks("draft_k.py")
    assert [block.splitlines()[0].strip() for block in reference] == [
        "# TRY NOT TO MODIFY: processes, run folder, resuming, tracking, seeding",
        "# TRY NOT TO MODIFY: resuming",
        "# TRY NOT TO MODIFY: logging, samples and checkpoints (rank 0's, with the global batch's numbers)",
        "# TRY NOT TO MODIFY: the final LoRA (StableDiffusionPipeline.from_pretrained(base)"
        ".load_lora_weights(run_dir))",
    ]
    assert all(len(block.splitlines()) > 2 for block in reference)
    for script in SCRIPTS:
        blocks = plumbing_blocks(script)
        assert len(blocks) == len(reference), script
        for block, expected in zip(blocks, reference):
            assert block == expected, f"{script} differs from draft_k.py in:\n{block.splitlines()[0]}"


@pytest.fixture(scope="module")
def lora_unet(tiny_sd_path):
    unet = load_sd(tiny_sd_path).unet
    add_lora(unet, rank=2)
    return unet


def test_a_checkpoint_is_written_whole_or_not_at_all(lora_unet, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(str(run / "checkpoints" / "step_000001"), lora_unet, {"step": 1})

    def killed(*args, **kwargs):  # the process dies after the LoRA is written, before state.pt
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(run / "checkpoints" / "step_000002"), lora_unet, {"step": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000001", "step_000002.tmp"]
    checkpoint_dir, state = find_checkpoint(str(run))  # the newest complete one
    assert checkpoint_dir.endswith("step_000001") and state == {"step": 1}


def test_resume_skips_incomplete_and_unreadable_checkpoints_and_names_a_corrupt_one(lora_unet, tmp_path, capsys):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(str(run / "checkpoints" / f"step_00000{step}"), lora_unet, {"step": step})
    (run / "checkpoints" / "step_000003" / "state.pt").write_bytes(b"")  # truncated by a full disk
    os.remove(run / "checkpoints" / "step_000002" / "pytorch_lora_weights.safetensors")
    checkpoint_dir, state = find_checkpoint(str(run))
    assert checkpoint_dir.endswith("step_000001") and state == {"step": 1}
    assert "skipping the unreadable checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # named explicitly: one sentence, no traceback
        find_checkpoint(str(run / "checkpoints" / "step_000003"))
    assert exit_info.value.code == 2 and "cannot be read" in capsys.readouterr().err


def test_truncate_metrics_keeps_what_the_checkpoint_had_logged(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"epoch": {i}, "loss": 0.5}}\n' for i in range(1, 6)))
    truncate_metrics(str(tmp_path), "epoch", 3)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_tiny_preset_sets_its_values_and_flags_still_override_them(script, monkeypatch):
    script_globals = definitions(script)

    def parse(*argv):
        monkeypatch.setattr(sys, "argv", [script, *argv])
        return cli(script_globals["Args"], script_globals["PRESETS"])

    default, tiny = parse(), parse("--num-steps", "3", "--preset", "tiny")
    assert default.preset == "sd14" and default.pretrained_model == "CompVis/stable-diffusion-v1-4"
    assert default.resolution == 512 and default.num_steps == 50
    assert tiny.preset == "tiny" and tiny.pretrained_model == "assets/tiny-sd" and tiny.resolution == 32
    assert tiny.num_steps == 3  # the flag, not the preset's value
    assert parse("--preset=tiny").resolution == 32
