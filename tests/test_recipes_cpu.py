"""Recipe inheritance (``base:``), the reduced-scale recipes and the training-split prefix."""
import dataclasses
import os
import re
import subprocess

import pytest

import train as train_script
from conftest import REPO, run_cli, tiny_overrides
from flipout_lstm.config import flat, load_config
from flipout_lstm.errors import ConfigError

CPU_RECIPES = sorted((REPO / "recipes" / "cpu").glob("*.yaml"))
SCALE_FIELDS = {"data.train_tokens", "data.eval_batch_size", "model.hidden_size",
                "model.embedding_size", "train.epochs", "train.patience", "train.log_every",
                "train.eval_every", "train.run_name"}


def full_size_recipe(path):
    """The paper recipe a reduced one extends: the first entry of its ``base:`` list."""
    import yaml
    base = yaml.safe_load(path.read_text())["base"]
    return (path.parent / (base[0] if isinstance(base, list) else base)).resolve()


def test_every_table_row_has_a_cpu_recipe():
    stems = {p.stem for p in CPU_RECIPES}
    assert {"char_unregularized", "char_semeniuta", "char_zoneout", "char_gal", "char_mult_gauss",
            "char_mult_gauss_flipout", "word_unregularized", "word_zaremba", "word_semeniuta",
            "word_gal", "word_zoneout", "word_wd", "word_wd_flipout", "large_batch_wd",
            "large_batch_wd_flipout"} <= stems


def test_large_batch_pair_differs_only_in_flipout():
    wd, flip = (flat(load_config(REPO / "recipes" / "cpu" / f"{n}.yaml").to_dict())
                for n in ("large_batch_wd", "large_batch_wd_flipout"))
    differ = {k for k in wd if wd[k] != flip[k]}
    assert differ == {"model.lstm.flipout", "train.run_name", "paper.row"}
    assert wd["data.batch_size"] == 128 and wd["optim.name"] == "adam"


@pytest.mark.parametrize("recipe", CPU_RECIPES, ids=lambda p: p.stem)
def test_cpu_recipe_changes_only_scale(recipe):
    """Every regularizer, optimizer and batch-layout setting is the full-size recipe's."""
    small, full = load_config(recipe), load_config(full_size_recipe(recipe))
    a, b = flat(small.to_dict()), flat(full.to_dict())
    changed = {k for k in a if a[k] != b[k]}
    # The large-batch pair has no table figures; its batch is the scale's largest affordable.
    table_row = not recipe.stem.startswith("large_batch")
    scale = SCALE_FIELDS if table_row else SCALE_FIELDS | {"data.batch_size"}
    assert changed <= scale, changed - scale
    assert small.paper.row and small.paper.row == full.paper.row
    if table_row:
        assert small.data.train_tokens > 0 and small.paper.valid and small.paper.test


@pytest.mark.parametrize("recipe", CPU_RECIPES, ids=lambda p: p.stem)
def test_cpu_recipe_dry_runs_and_trains_two_steps(recipe, tiny_ptb, tmp_path, capsys):
    assert train_script.main([str(recipe), "--dry-run"]) == 0
    assert "# parameters: " in capsys.readouterr().out
    # The tiny corpus is smaller than the recipe's prefix of the training split, so use all of it.
    over = tiny_overrides(tiny_ptb, tmp_path, **{"train.max_steps": 2, "data.train_tokens": 0})
    assert train_script.main([str(recipe), *over]) == 0
    assert (tmp_path / recipe.stem / "best.pt").is_file()


def test_base_list_merges_in_order_and_own_keys_win(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  hidden_size: 10\n  num_layers: 3\ntrain:\n  epochs: 7\n")
    (tmp_path / "b.yaml").write_text("model:\n  hidden_size: 20\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: [../a.yaml, ../b.yaml]\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml", ["model.num_layers=4"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.epochs) == (20, 4, 9)
    assert cfg.train.run_name == "c"
    assert "base" not in cfg.to_dict()


@pytest.mark.parametrize("text, message", [
    ("base: missing.yaml\n", "base recipe 'missing.yaml' not found"),
    ("base: 3\n", "base must be the path of another recipe"),
    ("base: [self.yaml]\n", "recipes cannot inherit in a cycle"),
])
def test_base_errors(tmp_path, text, message):
    (tmp_path / "self.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "self.yaml")


def test_unknown_key_in_a_base_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  hiden_size: 10\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="did you mean 'model.hidden_size'"):
        load_config(tmp_path / "b.yaml")


def test_train_tokens_takes_a_prefix(tiny_ptb, tmp_path):
    over = tiny_overrides(tiny_ptb, tmp_path, **{"train.epochs": 1, "data.train_tokens": 200,
                                                "data.bptt": 10, "data.batch_size": 4})
    assert train_script.main(["recipes/word_ptb.yaml", *over]) == 0
    import json
    summary = json.loads((tmp_path / "word_ptb" / "run.json").read_text())
    # 200 tokens in 4 columns of 50: 49 predicted rows, 5 batches of at most 10 rows.
    assert summary["steps"] == 5 and summary["tokens_seen"] == 49 * 4


def test_train_tokens_beyond_the_split_is_an_error(tiny_ptb, tmp_path):
    proc = run_cli("train.py", "recipes/word_ptb.yaml",
                   *tiny_overrides(tiny_ptb, tmp_path, **{"data.train_tokens": 10**9}))
    assert proc.returncode == 2
    assert "data.train_tokens=1,000,000,000 exceeds the training split" in proc.stderr
    with pytest.raises(ConfigError, match="data.train_tokens: must be >= 0"):
        load_config("recipes/word_ptb.yaml", ["data.train_tokens=-1"])


def test_paper_section_is_checked():
    with pytest.raises(ConfigError, match="paper.valid: must be a positive score"):
        load_config("recipes/word_ptb.yaml", ["paper.valid=-3"])
    assert dataclasses.asdict(load_config("recipes/char_ptb.yaml").paper) == \
        {"row": "Table 2: Mult. Gauss + Flipout", "valid": 1.256, "test": 1.227}


PTB_RECIPES = sorted((REPO / "recipes" / "ptb").glob("[cw]*_*.yaml"))
# What each table's scale changes against the full-size recipe, and the size and training
# prefix it chose: Table 3 at the anchor's size on the whole split, Table 2 at the char pilot's.
PTB_SCALE = {"word": {"model.hidden_size": 200, "model.embedding_size": 200, "data.train_tokens": 0},
             "char": {"model.hidden_size": 512, "data.train_tokens": 2_000_000}}


def test_every_table_row_has_a_ptb_scale_recipe():
    assert {p.stem for p in PTB_RECIPES} == {
        "word_unregularized", "word_wd", "word_wd_flipout", "word_gal", "word_semeniuta",
        "word_zaremba", "word_zoneout", "char_unregularized", "char_semeniuta", "char_zoneout",
        "char_gal", "char_mult_gauss", "char_mult_gauss_flipout"}


@pytest.mark.parametrize("recipe", PTB_RECIPES, ids=lambda p: p.stem)
def test_ptb_scale_recipe_changes_only_the_size_and_the_budget(recipe):
    """recipes/ptb (issue 18): each table's size (and, for characters, its training prefix);
    the regularizers, the optimizer, its schedule and the batch are the paper's, row by row."""
    small, full = load_config(recipe), load_config(full_size_recipe(recipe))
    a, b = flat(small.to_dict()), flat(full.to_dict())
    changed = {k for k in a if a[k] != b[k]}
    size = PTB_SCALE[small.data.level]
    assert changed <= set(size) | {"train.epochs", "train.patience", "train.log_every",
                               "train.run_name", "train.precision"}, changed
    assert {k: a[k] for k in size} == size
    assert small.train.precision == "bf16"  # every row of both tables in one precision
    if small.data.level == "word":
        assert (small.data.batch_size, small.data.bptt, small.optim.lr,
                small.optim.schedule) == (40, 35, 30.0, "decay")
    else:
        assert (small.data.batch_size, small.data.bptt, small.optim.name, small.optim.lr,
                small.optim.clip) == (32, 100, "amsgrad", 0.002, 1.0)


@pytest.mark.parametrize("row", ["char_unregularized", "char_mult_gauss"])
def test_the_precision_pilots_are_their_rows_in_float32(row):
    pilot = load_config(REPO / "recipes" / "ptb" / "pilots" / f"{row}_fp32.yaml")
    recipe = load_config(REPO / "recipes" / "ptb" / f"{row}.yaml")
    a, b = flat(pilot.to_dict()), flat(recipe.to_dict())
    assert {k for k in a if a[k] != b[k]} == {"train.precision", "train.run_name"}
    assert (pilot.train.precision, recipe.train.precision) == ("fp32", "bf16")


def test_the_ptb_large_batch_pair_differs_only_in_flipout():
    """recipes/ptb/large_batch_*: the appendix's large-batch recipe at Table 3's size, a batch
    at least 16x the paper's 40, the two arms alike but for flipout."""
    wd, flip = (load_config(REPO / "recipes" / "ptb" / f"{n}.yaml")
                for n in ("large_batch_wd", "large_batch_wd_flipout"))
    a, b = flat(wd.to_dict()), flat(flip.to_dict())
    assert {k for k in a if a[k] != b[k]} == {"model.lstm.flipout", "train.run_name", "paper.row"}
    assert flip.data.batch_size >= 16 * 40 and flip.model.lstm.flipout and not wd.model.lstm.flipout
    assert (flip.model.num_layers, flip.model.hidden_size, flip.model.embedding_size) == (2, 200, 200)
    full = load_config(REPO / "recipes" / "word_awd_flipout_large_batch.yaml")
    assert (flip.optim.name, flip.optim.lr, flip.model.lstm.weight_drop, flip.model.lstm.input_weight_drop) \
        == (full.optim.name, full.optim.lr, full.model.lstm.weight_drop, full.model.lstm.input_weight_drop)


@pytest.mark.parametrize("study", ["cpu", "ptb"])
def test_the_files_a_study_collects_are_not_ignored_by_git(study):
    """What ``study.sh collect`` copies into results/ is committed evidence: a .gitignore
    pattern that matches it (``runs/`` once did) silently keeps every run out of git."""
    script = (REPO / "results" / study / "study.sh").read_text()
    (dst,) = re.findall(r"dst=(\S+)\$\(basename", script)
    parts = re.search(r"for part in ([\w ]+); do", script)
    folders = [dst.replace("$part", p) for p in (parts.group(1).split() if parts else [""])]
    paths = [f"{folder}word_wd-s1/{name}" for folder in folders
             for name in ("config.yaml", "metrics.jsonl", "run.json")]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO,
                             capture_output=True, text=True).stdout.split()
    assert ignored == [], f"git ignores collected run files: {ignored}"


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_study_part_on_a_new_machine_skips_the_runs_committed_here(tmp_path, threads):
    """``study.sh anchor`` with an empty output folder (a new machine) copies the committed
    runs' files into it, so the sweep counts them done instead of training them again; a part
    run on both cores (THREADS=2: a bookkeeping override) counts them done too."""
    runs = sorted(p.name for p in (REPO / "results" / "ptb" / "anchor" / "runs").iterdir())
    seeds = ",".join(r.rsplit("-s", 1)[1] for r in runs)
    env = dict(os.environ, STUDY_OUT=str(tmp_path), SEEDS=seeds, THREADS=threads)
    res = subprocess.run(["bash", "results/ptb/study.sh", "anchor"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"all {len(runs)} runs done" in res.stdout, res.stdout
    assert res.stdout.count(", skipped") == len(runs), res.stdout
    for run in runs:
        got = sorted(p.name for p in (tmp_path / "anchor" / run).iterdir())
        assert got == ["config.yaml", "metrics.jsonl", "run.json"], (run, got)  # nothing trained
        assert ((tmp_path / "anchor" / run / "metrics.jsonl").read_bytes()
                == (REPO / "results" / "ptb" / "anchor" / "runs" / run / "metrics.jsonl").read_bytes())
