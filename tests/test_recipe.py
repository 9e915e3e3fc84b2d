"""Recipes: every run writes the options it ran with; a recipe repeats the run exactly, and flags win over it."""

import json

import pytest
import torch
import yaml

import regrow
from regrow import checkpoint
from regrow.cli import main

SMALL = ["--model", "mlp", "--dataset", "synthetic", "--batch-size", "16", "--max-steps", "16", "--no-progress",
         "--device", "cpu"]


def tensors(folder):
    sections, _ = checkpoint.load(folder / "model.safetensors")
    return sections["model"]


def test_a_runs_recipe_repeats_it_exactly_and_flags_win(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["train", *SMALL, "--method", "iee", "--sparsity", "0.8", "--opt", "estimate_steps=2",
                 "--opt", "improve_steps=1", "--opt", "explore_steps=2", "--no-augment", "--synthetic-size", "96",
                 "--epochs", "3", "--out", str(first)]) == 0
    recipe = yaml.safe_load((first / "recipe.yaml").read_text())
    given = {"estimate_steps": 2, "improve_steps": 1, "explore_steps": 2}
    assert recipe["method"] == "iee" and list(recipe["opt"])[:3] == list(given)
    # the options not given are written resolved, so the recipe repeats the run after a default changes
    defaults = regrow.methods.method_options(regrow.IEE)
    assert recipe["opt"] == {**given, **{k: defaults[k] for k in ("include", "criterion", "alpha", "schedule",
                                                                  "t_end", "ranking", "start", "never_active",
                                                                  "never_active_scale", "explore_lr_scale",
                                                                  "explore", "freeze_active", "freeze_bn",
                                                                  "grow_init", "grown_state", "max_cycles")}}
    assert recipe["no_augment"] is True and recipe["synthetic_size"] == 96 and "out" not in recipe
    again = tmp_path / "again"
    assert main(["train", "--recipe", str(first / "recipe.yaml"), "--out", str(again), "--no-progress"]) == 0
    a, b = tensors(first), tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "metrics.jsonl").read_text() == (again / "metrics.jsonl").read_text()
    assert (first / "recipe.yaml").read_text() == (again / "recipe.yaml").read_text()
    # a flag given on the command line wins; --opt adds to the recipe's options
    other = tmp_path / "other"
    assert main(["train", "--recipe", str(first / "recipe.yaml"), "--seed", "1", "--opt", "alpha=0.2",
                 "--out", str(other), "--no-progress"]) == 0
    config = json.loads((other / "summary.json").read_text())["config"]
    assert config["seed"] == 1 and config["method_options"]["alpha"] == 0.2
    assert config["method_options"]["explore_steps"] == 2 and config["augment"] is False


def test_a_recipe_written_before_an_option_existed_repeats_the_run_without_it(tmp_path):
    """A channel IEE recipe from before ``explore_from`` existed ran from the remembered values; the default is zero
    now. Likewise the first cut went straight to the budget before ``ramp_cycles`` (whose default is now a ramp). A
    recipe regrow wrote (its header) gets the old values; a hand-written one today's defaults."""
    first = tmp_path / "first"
    assert main(["train", *SMALL, "--model", "resnet8", "--method", "iee", "--structure", "channel", "--cost", "macs",
                 "--latency-target", "0.6", "--opt", "estimate_steps=2", "--opt", "improve_steps=1",
                 "--opt", "explore_steps=2", "--out", str(first)]) == 0
    text = (first / "recipe.yaml").read_text()
    assert "explore_from: zero" in text and "ramp_cycles: null" in text
    old = tmp_path / "old.yaml"
    # as regrow wrote it before the options existed
    old.write_text(text.replace("  explore_from: zero\n", "").replace("  ramp_cycles: null\n", ""))
    hand = tmp_path / "hand.yaml"
    hand.write_text(old.read_text().split("\n", 1)[1])  # the same options without regrow's header
    for recipe, explore_from, ramp_cycles in ((old, "remembered", 0), (hand, "zero", None)):
        out = tmp_path / recipe.stem
        assert main(["train", "--recipe", str(recipe), "--max-steps", "8", "--out", str(out), "--no-progress"]) == 0
        options = json.loads((out / "summary.json").read_text())["config"]["method_options"]
        assert options.get("explore_from", "zero") == explore_from
        assert options.get("ramp_cycles") == ramp_cycles
        written = yaml.safe_load((out / "recipe.yaml").read_text())["opt"]
        assert written["explore_from"] == explore_from and written["ramp_cycles"] == ramp_cycles


def test_a_dense_runs_recipe_is_accepted_back(tmp_path):
    assert main(["train", *SMALL, "--method", "dense", "--out", str(tmp_path / "d")]) == 0
    assert "sparsity" not in yaml.safe_load((tmp_path / "d" / "recipe.yaml").read_text())
    assert main(["train", "--recipe", str(tmp_path / "d" / "recipe.yaml"), "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 0


@pytest.mark.parametrize("text, message", [
    ("model: mlp\nbatch_sise: 16\n", "unknown option 'batch_sise'"),
    ("epochs: three\n", "epochs must be an integer"),
    ("epochs: 1.5\n", "epochs must be an integer"),
    ("lr: true\n", "lr must be float"),
    ("no_augment: 1\n", "no_augment must be true or false"),
    ("structure: 2:4\n", "structure must be a string, got 124"),
    ("amp: fp8\n", "amp must be one of none, bf16"),
    ("opt: [1, 2]\n", "opt must be a mapping"),
    ("- model\n", "must be a mapping of option: value"),
    ("model: [unclosed\n", "is not valid YAML"),
    ("out: somewhere\n", "unknown option 'out'"),
])
def test_a_bad_recipe_is_one_line_before_any_work(tmp_path, capsys, text, message):
    (tmp_path / "r.yaml").write_text(text)
    assert main(["train", "--recipe", str(tmp_path / "r.yaml"), "--dataset", "synthetic",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_missing_recipe(tmp_path, capsys):
    assert main(["train", "--recipe", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read recipe" in capsys.readouterr().err
