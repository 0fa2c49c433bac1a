import pytest
import torch

from common.prompts import PROMPT_SETS, load_prompts, sample_prompts


def test_prompt_sets():
    animals = load_prompts("simple_animals")
    assert len(animals) == 45 == len(set(animals)) and animals[:3] == ["cat", "dog", "horse"]
    activities = load_prompts("nouns_activities")
    assert len(activities) == 45 * 3
    assert "an ant washing the dishes" in activities and "a cat playing chess" in activities
    shapes = load_prompts("shapes")
    assert len(shapes) == len(set(shapes)) == 3 * 6 * 5  # shapes x shape colours x other background colours
    assert "a red circle on a white background" in shapes and "a blue triangle on a yellow background" in shapes
    assert "a red square on a red background" not in shapes


def test_prompt_file_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\n\n  a blue whale  \n")
    assert load_prompts(prompt_file=str(path)) == ["a red fox", "a blue whale"]


@pytest.mark.parametrize("setup, expected", [
    (lambda tmp: dict(name="animals"), "unknown prompt set 'animals'; choose one of: simple_animals, nouns_activities"),
    (lambda tmp: dict(prompt_file=str(tmp / "missing.txt")), "does not exist"),
    (lambda tmp: dict(prompt_file=str((tmp / "empty.txt").write_text("\n\n") and tmp / "empty.txt")), "has no prompts"),
])  # fmt: skip
def test_bad_prompt_input_ends_with_a_clear_message(tmp_path, capsys, setup, expected):
    with pytest.raises(SystemExit) as exit_info:
        load_prompts(**setup(tmp_path))
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_sampling_is_seeded():
    prompts = PROMPT_SETS["simple_animals"]
    first = sample_prompts(prompts, 8, torch.Generator().manual_seed(0))
    assert first == sample_prompts(prompts, 8, torch.Generator().manual_seed(0))
    assert first != sample_prompts(prompts, 8, torch.Generator().manual_seed(1))
    assert set(first) <= set(prompts)
