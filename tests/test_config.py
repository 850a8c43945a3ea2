"""Recipes and overrides: every recipe loads, every mistake is a one-line error naming the key."""

import re

import pytest

from conftest import REPO, run_cli, run_main
from flipout_lstm.config import load_config
from flipout_lstm.errors import ConfigError
from flipout_lstm.model import LanguageModel

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TRAIN_RECIPES = [p for p in RECIPES if p.stem != "grad_variance"]


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_builds(recipe):
    cfg = load_config(recipe)
    assert cfg.train.run_name == recipe.stem
    vocab = 50 if cfg.data.level == "char" else 10_000
    LanguageModel(cfg.model, vocab)


def test_paper_settings_and_parameter_counts():
    char = load_config(REPO / "recipes/char_ptb.yaml")
    assert (char.data.batch_size, char.data.bptt, char.optim.name, char.optim.lr, char.optim.clip) == \
        (32, 100, "amsgrad", 0.002, 1.0)
    assert char.model.lstm.weight_noise == 1.0 and char.model.lstm.flipout
    # The paper quotes 4.26M (char) and 19.8M (word) parameters.
    assert LanguageModel(char.model, 50).num_parameters() == 4_258_050
    word = load_config(REPO / "recipes/word_ptb.yaml")
    assert (word.data.batch_size, word.data.bptt, word.optim.name, word.optim.lr, word.optim.clip) == \
        (40, 35, "sgd", 30.0, 0.25)
    assert word.model.lstm.weight_drop == 0.5 and word.model.lstm.flipout
    assert LanguageModel(word.model, 10_000).num_parameters() == 19_780_400


def test_overrides_are_typed():
    cfg = load_config(REPO / "recipes/char_ptb.yaml",
                      ["train.epochs=2", "model.hidden_size=256", "optim.lr=1e-3",
                       "data.root=/x/y", "model.lstm.flipout=false", "optim.betas=[0.8, 0.9]",
                       "train.run_name=mine"])
    assert cfg.train.epochs == 2 and cfg.model.hidden_size == 256 and cfg.optim.lr == 0.001
    assert cfg.data.root == "/x/y" and cfg.model.lstm.flipout is False
    assert cfg.optim.betas == (0.8, 0.9) and cfg.train.run_name == "mine"


@pytest.mark.parametrize("overrides, message", [
    (["model.hiden_size=3"], r"unknown config key 'model.hiden_size' \(did you mean 'model.hidden_size'\?\)"),
    (["trian.epochs=3"], r"unknown config key 'trian' \(did you mean 'train'\?\)"),
    (["train.epochs=two"], r"train.epochs: expected an integer, got 'two'"),
    (["train.epochs=0"], r"train.epochs: must be positive"),
    (["model.hidden_size=-4"], r"model.hidden_size: must be positive"),
    (["model.lstm.hidden_dropout=1.0"], r"model.lstm.hidden_dropout: 1.0 is not a probability"),
    (["model.lstm.zoneout_cell=-0.1"], r"model.lstm.zoneout_cell: -0.1 is not a probability"),
    (["model.lstm.weight_noise=0", "model.lstm.weight_drop=0.3"],
     r"model.lstm.weight_drop: flipout DropConnect needs exactly 0.5 .*or model.lstm.weight_noise"),
    (["model.lstm.weight_noise=0"], r"model.lstm.flipout: flipout needs a weight perturbation"),
    (["model.lstm.weight_drop=0.5"], r"model.lstm.weight_drop: cannot be combined with model.lstm.weight_noise"),
    (["model.lstm.weight_noise=-1"], r"model.lstm.weight_noise: -1.0 must be a finite standard deviation >= 0"),
    (["optim.name=adamw"], r"optim.name: 'adamw' is not one of 'amsgrad', 'adam', 'sgd'"),
    (["optim.schedule=ntasgd"], r"ntasgd averages SGD iterates; set optim.name=sgd"),
    (["train.epochs"], r"not of the form key.path=value"),
    (["model.lstm=3"], r"model.lstm: expected a mapping"),
    (["train.epochs.x=3"], r"'train.epochs' is a value, not a section"),
    (["data.carry_state=true"], r"data.carry_state: shuffled sequences cannot carry"),
    # A bare key, or one in the wrong section, is suggested with its section.
    (["epochs=2"], r"unknown config key 'epochs' \(did you mean 'train.epochs'\?\)"),
    (["epoch=2"], r"unknown config key 'epoch' \(did you mean 'train.epochs'\?\)"),
    (["hidden_dropout=0.1"], r"'hidden_dropout' \(did you mean 'model.lstm.hidden_dropout'\?\)"),
    (["data.seed=3"], r"unknown config key 'data.seed' \(did you mean 'train.seed'\?\)"),
    (["name=sgd"], r"unknown config key 'name' \(did you mean 'data.name' or 'optim.name'\?\)"),
    (["model.input_dropout=0.2"], r"model.input_dropout: one-hot input has no input vector to drop"),
    (["train.checkpoint_minutes=-1"], r"train.checkpoint_minutes: must be >= 0 minutes"),
    (["train.threads=0"], r"train.threads: must be a positive number of CPU threads"),
    (["optim.decay_rule=once_per_windw"], r"optim.decay_rule: 'once_per_windw' is not one of 'once_per_window', "
                                r"'every_eval' \(did you mean 'once_per_window'\?\)"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "recipes/char_ptb.yaml", overrides)


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  level: char\n model: [\n")
    with pytest.raises(ConfigError, match=r"line 3, column 2: YAML syntax error"):
        load_config(bad)
    bad.write_text("data:\n  levle: char\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.levle' \(did you mean 'data.level'\?\)"):
        load_config(bad)
    bad.write_text("epochs: 3\n")  # a top-level key of the train section
    with pytest.raises(ConfigError, match=r"unknown config key 'epochs' \(did you mean 'train.epochs'\?\)"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("run, args, message", [
    # One from the command line, a process of its own: the exit status and stderr as a shell
    # sees them. The others in-process (train.py's main(), what it returns and prints), without
    # an interpreter's start.
    pytest.param(run_cli, ["recipes/char_ptb.yaml", "model.hiden_size=3"], "did you mean 'model.hidden_size'?",
                 id="subprocess-unknown-key"),
    pytest.param(run_main, ["recipes/nope.yaml"], "recipe file 'recipes/nope.yaml' not found",
                 id="missing-recipe"),
    pytest.param(run_main, ["recipes/char_ptb.yaml", "model.lstm.weight_noise=0", "model.lstm.weight_drop=0.2"],
                 "flipout DropConnect needs exactly 0.5", id="invalid-combination"),
])
def test_cli_config_errors_exit_2_with_one_line(run, args, message):
    proc = run("train.py", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize("recipe, vocab, by_hand", [
    # embedding, decoder (weight and bias), two layers (two bias vectors each, as torch.nn.LSTM)
    ("word_ptb", 10_000, 10_000 * 650 + 10_000 * 200 + 10_000 + 4 * 200 * (650 + 200 + 2)
     + 4 * 200 * (200 + 200 + 2)),
    # one-hot input (no embedding), one layer, decoder
    ("char_ptb", 50, 4 * 200 * (50 + 200 + 2) + 200 * 50 + 50),
])
def test_dry_run_prints_config_and_parameter_count(recipe, vocab, by_hand):
    """The config as resolved, then the count of the model train.py would build on PTB's
    vocabulary (10,000 words, 50 characters), before any data is read."""
    proc = run_main("train.py", f"recipes/{recipe}.yaml", "model.hidden_size=200", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(REPO / f"recipes/{recipe}.yaml", ["model.hidden_size=200"])
    *config, last = proc.stdout.splitlines()
    assert "\n".join(config) + "\n" == cfg.to_yaml() and "  hidden_size: 200" in config
    printed = re.fullmatch(r"# parameters: ([\d,]+)", last)
    assert printed, last
    expected = LanguageModel(cfg.model, vocab).num_parameters()
    assert int(printed.group(1).replace(",", "")) == expected == by_hand
    assert printed.group(1) == f"{expected:,}"


def test_new_train_fields_load():
    cfg = load_config(REPO / "recipes/char_ptb.yaml", ["train.threads=2", "train.checkpoint_minutes=0.5",
                                                       "optim.decay_rule=every_eval"])
    assert (cfg.train.threads, cfg.train.checkpoint_minutes, cfg.optim.decay_rule) == (2, 0.5, "every_eval")
    default = load_config(REPO / "recipes/char_ptb.yaml")
    assert (default.train.threads, default.train.checkpoint_minutes, default.optim.decay_rule) == \
        (None, 30.0, "once_per_window")


def test_dry_run_into_a_closed_pipe_has_no_traceback():
    """`train.py recipe --dry-run | head -5`: the reader leaves before the output ends."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.Popen([sys.executable, "train.py", "recipes/word_ptb.yaml", "--dry-run"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
