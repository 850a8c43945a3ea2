"""Recipes: typed, validated configuration loaded from YAML with ``key.path=value`` overrides.

A recipe is a YAML mapping with the sections ``data``, ``model`` (with a nested ``lstm``),
``optim`` and ``train``. Every field is declared below with its type and default; a recipe only
names what differs from the defaults. Loading checks, before anything runs:

- every key exists (a typo gets the closest valid key as a suggestion),
- every value has the declared type (ints are accepted where floats are expected),
- every value is in range (probabilities in [0, 1), positive sizes, choices from a list).

Any violation raises :class:`flipout_lstm.errors.ConfigError` with a one-line message naming the key path.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml

from flipout_lstm.errors import ConfigError
from flipout_lstm.nn.lstm import LSTMArgumentError, check_regularizers


def bound(default):
    """A bound on training (epochs, steps, patience): part of what a run is, but a resumed run
    may raise it (``--resume`` applies and records the new value)."""
    return field(default=default, metadata={"role": "bound"})


def bookkeeping(default):
    """Where and how a run is written, read or shown (paths, devices, logging, the paper's
    labels), not what it trains: a resumed run may change it, and runs that differ only in it
    are the same experiment (``flipout_lstm.report`` groups them)."""
    return field(default=default, metadata={"role": "bookkeeping"})


# Every other field fixes the experiment (model, data, optimizer, noise, schedule, seed): a
# change on --resume is refused (resume_changes), and a report keeps such runs apart.


@dataclass
class DataConfig:
    # The kind of token, the one field that decides it: char (PTB's character view on ptb,
    # plain characters elsewhere) | word (Mikolov's PTB vocabulary on ptb unless data.min_count
    # asks to rebuild it; whitespace-split words elsewhere) | subword (sentencepiece pieces).
    # Every level-keyed default (the metric, the evaluation warm-up) follows it.
    level: Literal["char", "word", "subword"] = "char"
    root: Optional[str] = bookkeeping(None)  # None: $LM_DATA_ROOT, else data/ptb
    url: Optional[str] = bookkeeping(None)  # PTB's archive; None: Mikolov's (flipout_lstm.data.ptb.PTB_URL)
    download: bool = bookkeeping(True)
    batch_size: int = 32
    bptt: int = 100
    # Shuffled non-overlapping sequences (the paper's character setting) cannot carry state.
    shuffle: bool = False
    carry_state: bool = True
    variable_bptt: bool = False
    # Columns scored at once: a character split is ~3,000 sequential steps at 128 (not 40,000
    # at 10), and with the warm-up below the figure is that of batch size 1.
    eval_batch_size: int = 128
    eval_bptt: Optional[int] = None  # None: same as bptt
    # Tokens each evaluation column reads, unscored, before its start, so that a batch scores
    # what batch size 1 does (flipout_lstm.data.EvalStream); null: the level's default, 0: none.
    eval_warmup: Optional[int] = None
    # Train on the first N tokens of the training split only (0: all of it); validation and
    # test stay whole. The reduced-scale recipes (recipes/cpu/) use it.
    train_tokens: int = 0
    # Any corpus (flipout_lstm.data.sources): ptb (root/url/download above), text (three plain-text
    # files, one document or sentence per line) or hf (a `datasets` dataset: a save_to_disk
    # folder `path`, or hub dataset `name`/`config`, cached by `datasets` for offline use).
    source: Literal["ptb", "text", "hf"] = "ptb"
    train: Optional[str] = None  # text: file paths
    valid: Optional[str] = None
    test: Optional[str] = None
    name: Optional[str] = None  # hf: e.g. wikitext
    config: Optional[str] = None  # hf: e.g. wikitext-2-raw-v1
    path: Optional[str] = None  # hf: a save_to_disk folder (used instead of name when set)
    train_split: str = "train"
    valid_split: str = "validation"
    test_split: str = "test"
    text_field: str = "text"
    min_count: Optional[int] = None  # word: tokens seen fewer times become <unk> (null: 1)
    vocab_size: Optional[int] = None  # subword: pieces, <eos> and unknown included
    sp_model: Optional[Literal["bpe", "unigram"]] = None  # subword (null: unigram)
    cache_dir: Optional[str] = bookkeeping(None)  # encoded corpora; null: $LM_CACHE_DIR, else ~/.cache/flipout_lstm


@dataclass
class LSTMConfig:
    """Arguments of :class:`flipout_lstm.nn.LSTM`'s regularizers, by their constructor names."""

    weight_drop: float = 0.0
    weight_noise: float = 0.0
    input_weight_drop: float = 0.0
    input_weight_noise: float = 0.0
    flipout: bool = False
    hidden_dropout: float = 0.0
    zoneout_cell: float = 0.0
    zoneout_hidden: float = 0.0
    cell_dropout: float = 0.0
    cell_dropout_per_step: bool = True


@dataclass
class ModelConfig:
    input: Literal["embedding", "onehot"] = "embedding"
    embedding_size: int = 650
    hidden_size: int = 650
    num_layers: int = 2
    tie_weights: bool = False
    # default: torch's LSTM init, embedding and decoder U(-0.1, 0.1) | orthogonal: each LSTM gate
    # block orthogonal, biases 0 (the paper's char setup) | uniform: every weight U(-s, s) with
    # s = init_scale, LSTM biases 0 (Zaremba et al.'s setup). See flipout_lstm/model.py.
    init: Literal["default", "orthogonal", "uniform"] = "default"
    init_scale: float = 0.1
    # Non-recurrent dropout: "locked" samples one mask per sequence (Gal, AWD-LSTM),
    # "standard" a new mask per time step (Zaremba).
    dropout_type: Literal["locked", "standard"] = "locked"
    embedding_dropout: float = 0.0  # drops whole word types (rows of the embedding)
    input_dropout: float = 0.0
    layer_dropout: float = 0.0
    output_dropout: float = 0.0
    lstm: LSTMConfig = field(default_factory=LSTMConfig)


@dataclass
class OptimConfig:
    name: Literal["amsgrad", "adam", "sgd"] = "amsgrad"
    lr: float = 0.002
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    # constant | decay: divide lr by lr_decay when the non-monotonic criterion fires |
    # ntasgd: switch to averaged SGD on the same trigger (Merity et al. 2017) |
    # step: lr divided by lr_decay after decay_start epochs, then every decay_every epochs
    # (PyTorch's StepLR with a delayed start; ExponentialLR when decay_every is 1).
    schedule: Literal["constant", "decay", "ntasgd", "step"] = "constant"
    nonmono: int = 5
    lr_decay: float = 4.0
    decay_start: int = 0  # step: epochs trained at optim.lr before the first division
    decay_every: int = 1  # step: epochs between divisions
    # decay: once_per_window (after a firing the criterion starts a fresh history, so it needs
    # nonmono new evaluations before it can fire again) | every_eval (the criterion over all
    # evaluations, checked at each one: it can fire at consecutive evaluations). See flipout_lstm/optim.py.
    decay_rule: Literal["once_per_window", "every_eval"] = "once_per_window"


@dataclass
class TrainConfig:
    epochs: int = bound(50)
    max_steps: int = bound(0)  # 0: no bound besides epochs
    seed: int = 1111
    device: str = bookkeeping("auto")  # auto | cpu | cuda | cuda:N
    run_name: Optional[str] = bookkeeping(None)  # None: the recipe's file name
    out_dir: str = bookkeeping("checkpoints")
    eval_every: int = 0  # steps; 0: once per epoch
    checkpoint_every: int = bookkeeping(0)  # steps; 0: once per epoch
    checkpoint_minutes: float = bookkeeping(30.0)  # also a checkpoint after this much time without one; 0: off
    keep_checkpoints: int = bookkeeping(3)
    log_every: int = bookkeeping(50)
    patience: int = bound(0)  # evaluations without improvement before stopping; 0: never
    ar: float = 0.0  # activation regularization (AWD-LSTM alpha)
    tar: float = 0.0  # temporal activation regularization (AWD-LSTM beta)
    # fp32 | bf16 | fp16 (CUDA) | auto (bf16 where native, else fp32): autocast around the
    # forward pass and the loss, weights and optimizer state float32 (flipout_lstm/precision.py).
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    # Under torchrun: global (every rank draws the whole batch's noise from one shared stream and
    # keeps its columns, so W ranks mean what one process on the global batch means: one shared
    # perturbation per batch) | per_rank (each rank its own stream: W independent perturbations).
    ddp_noise: Literal["global", "per_rank"] = "global"
    on_nonfinite: Literal["error", "skip"] = bookkeeping("error")
    tensorboard: bool = bookkeeping(True)
    progress: bool = bookkeeping(True)
    threads: Optional[int] = bookkeeping(None)  # CPU threads (torch.set_num_threads); null: torch's default


@dataclass
class PaperConfig:
    """The published figures a recipe reproduces, shown by ``flipout_lstm.report`` beside ours."""

    row: Optional[str] = bookkeeping(None)  # e.g. "Table 2: Mult. Gauss + Flipout"
    valid: Optional[float] = bookkeeping(None)
    test: Optional[float] = bookkeeping(None)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flat(d: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{"section.key": value}`` (how overrides and diffs name fields)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _field_paths(cls, prefix: str = ""):
    """``(dotted path, dataclasses.Field)`` for every leaf field of a schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _field_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def fields_with(role: str) -> set:
    """The dotted keys of the fields declared with ``role`` (:func:`bound`, :func:`bookkeeping`)."""
    return {key for key, f in _field_paths(Config) if f.metadata.get("role") == role}


def resume_changes(saved: dict, now: "Config") -> tuple[list, list]:
    """What a resumed run changes, as ``(applied, refused)`` lists of ``(key, then, now)``.

    ``saved`` is the checkpoint's config dict; a field newer than the checkpoint had its
    default when the checkpoint was written. ``applied``: the :func:`bound` and
    :func:`bookkeeping` fields; ``refused``: any other field, since it fixes the experiment.
    """
    then, current = as_current(saved), flat(now.to_dict())
    applied, refused = [], []
    for key, f in _field_paths(Config):
        old, new = then.get(key), current.get(key)
        if old != new:
            (applied if f.metadata.get("role") else refused).append((key, old, new))
    return applied, refused


def _plain(obj):
    """Tuples become lists so that YAML and torch.load(weights_only=True) both read them back."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- building


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return "a list of " + str(len(typing.get_args(tp))) + " numbers"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp, path: str):
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{path}: {value!r} is not {_type_name(tp)}{extra}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{path}: expected a non-empty list, got {value!r}")
        return [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module


def _key_paths(cls, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a schema, sections included: ('train',), ('train', 'epochs'), ..."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out.append(prefix + (name,))
        if dataclasses.is_dataclass(tp):
            out += _key_paths(tp, prefix + (name,))
    return out


def _section(root, prefix: tuple):
    for key in prefix:
        root = typing.get_type_hints(root)[key]
    return root


# Keys that were replaced, with what to write instead.
RENAMED = {"data.tokenizer": "it was replaced by data.level: char, word or subword (sentencepiece)"}


def did_you_mean(root, prefix: tuple, key: str) -> str:
    """The suggestion for an unknown ``key`` in section ``prefix`` of schema ``root``, e.g.
    `` (did you mean 'train.epochs'?)``, or ``''``.

    In order: the same name in another section (a bare ``epochs``, a misplaced ``data.seed``:
    every such path is named), a close name in the same section (``model.hiden_size``), a
    close name anywhere (a bare ``epoch``).
    """
    renamed = RENAMED.get(".".join(prefix + (key,)))
    if renamed:
        return f" ({renamed})"
    paths = _key_paths(root)
    same = sorted(".".join(p) for p in paths if p[-1] == key and p[:-1] != prefix)
    if not same:
        names = [f.name for f in dataclasses.fields(_section(root, prefix))]
        close = difflib.get_close_matches(key, names, n=1)
        same = [".".join(prefix + (close[0],))] if close else []
    if not same:
        close = difflib.get_close_matches(key, sorted({p[-1] for p in paths}), n=1)
        same = sorted(".".join(p) for p in paths if close and p[-1] == close[0])
    if not same:
        return ""
    return " (did you mean " + " or ".join(f"'{p}'" for p in same) + "?)"


def build_section(cls, raw, path: str, _root=None):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            prefix = tuple(path.split(".")) if _root is not None and path else ()
            extra = did_you_mean(_root or cls, prefix, str(key))
            raise ConfigError(f"unknown config key '{where}'{extra}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        sub = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, raw[name], sub, _root or cls)
        else:
            kwargs[name] = coerce(raw[name], tp, sub)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, path: str, msg: str):
    if not cond:
        raise ConfigError(f"{path}: {msg}")


def _prob(value: float, path: str):
    _check(0.0 <= value < 1.0, path, f"{value} is not a probability in [0, 1)")


def validate_source(d: DataConfig) -> None:
    """The corpus and tokenizer fields fit together: each source has its own keys, each
    tokenizer its own settings."""
    own = {"text": ("train", "valid", "test"), "hf": ("name", "config", "path")}
    for source, keys in own.items():
        for key in keys:
            _check(d.source == source or getattr(d, key) is None, f"data.{key}",
                   f"belongs to data.source={source}, but the source is {d.source}; remove it or "
                   f"set data.source={source}")
    if d.source == "text":
        missing = [f"data.{k}" for k in own["text"] if not getattr(d, k)]
        _check(not missing, missing[0] if missing else "", "data.source=text needs data.train, "
               "data.valid and data.test (paths to plain-text files, one line per sentence)")
    if d.source == "hf":
        _check(bool(d.name or d.path), "data.name", "data.source=hf needs a dataset: data.name "
               "(e.g. wikitext with data.config=wikitext-2-raw-v1) or data.path (a save_to_disk folder)")
        for key in ("train_split", "valid_split", "test_split", "text_field"):
            _check(bool(getattr(d, key)), f"data.{key}", "must not be empty")
    sp = d.level == "subword"
    _check(not sp or d.vocab_size is not None, "data.vocab_size",
           "data.level=subword needs data.vocab_size (sentencepiece pieces, e.g. 8000)")
    _check(sp or d.vocab_size is None, "data.vocab_size",
           f"only applies to data.level=subword (the level is {d.level}); remove it or set "
           f"data.level=subword")
    _check(sp or d.sp_model is None, "data.sp_model",
           f"only applies to data.level=subword (the level is {d.level}); remove it or set "
           f"data.level=subword")
    if d.vocab_size is not None:
        _check(d.vocab_size >= 3, "data.vocab_size", f"must be at least 3, got {d.vocab_size}")
    _check(d.level == "word" or d.min_count is None, "data.min_count",
           f"only applies to data.level=word (the level is {d.level}); remove it or set "
           f"data.level=word")
    if d.min_count is not None:
        _check(d.min_count >= 1, "data.min_count", f"must be >= 1, got {d.min_count}")


def validate(cfg: Config) -> Config:
    """Range and consistency checks that types alone cannot express."""
    d, m, o, t, r = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.model.lstm
    validate_source(d)
    _check(d.train_tokens >= 0, "data.train_tokens", f"must be >= 0 (0: the whole training split), "
           f"got {d.train_tokens}")
    for name in ("valid", "test"):
        value = getattr(cfg.paper, name)
        _check(value is None or value > 0, f"paper.{name}", f"must be a positive score or null, got {value}")
    for name in ("batch_size", "bptt", "eval_batch_size"):
        _check(getattr(d, name) > 0, f"data.{name}", f"must be positive, got {getattr(d, name)}")
    if d.eval_bptt is not None:
        _check(d.eval_bptt > 0, "data.eval_bptt", f"must be positive, got {d.eval_bptt}")
    if d.eval_warmup is not None:
        _check(d.eval_warmup >= 0, "data.eval_warmup",
               f"must be >= 0 tokens (0: no warm-up; null: the level's default), got {d.eval_warmup}")
    _check(not (d.shuffle and d.carry_state), "data.carry_state",
           "shuffled sequences cannot carry the hidden state; set data.carry_state=false "
           "or data.shuffle=false")
    _check(not (d.shuffle and d.variable_bptt), "data.variable_bptt",
           "variable-length BPTT needs a contiguous stream; set data.shuffle=false")
    for name in ("embedding_size", "hidden_size", "num_layers"):
        _check(getattr(m, name) > 0, f"model.{name}", f"must be positive, got {getattr(m, name)}")
    for name in ("embedding_dropout", "input_dropout", "layer_dropout", "output_dropout"):
        _prob(getattr(m, name), f"model.{name}")
    _check(m.init_scale > 0, "model.init_scale", f"must be positive, got {m.init_scale}")
    if m.input == "onehot":
        _check(m.input_dropout == 0.0, "model.input_dropout",
               "one-hot input has no input vector to drop (it is a column lookup); set it to 0 "
               "(regularize the characters with model.lstm.* or model.layer_dropout) or "
               "model.input=embedding")
        _check(m.embedding_dropout == 0.0, "model.embedding_dropout",
               "one-hot input has no embedding to drop; set it to 0 or model.input=embedding")
        _check(not m.tie_weights, "model.tie_weights",
               "one-hot input has no embedding to tie; set it to false")
    try:  # the layer owns its arguments' rules; its messages name this config's keys
        check_regularizers(vars(r), name=lambda arg: f"model.lstm.{arg}")
    except LSTMArgumentError as exc:
        raise ConfigError(str(exc)) from None
    _check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    _check(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _check(o.clip >= 0, "optim.clip", f"must be >= 0 (0 turns clipping off), got {o.clip}")
    _check(o.nonmono > 0, "optim.nonmono", f"must be positive, got {o.nonmono}")
    _check(o.lr_decay > 1.0, "optim.lr_decay", f"must be > 1, got {o.lr_decay}")
    _check(o.decay_start >= 0, "optim.decay_start", f"must be >= 0 epochs, got {o.decay_start}")
    _check(o.decay_every > 0, "optim.decay_every", f"must be a positive number of epochs, got "
           f"{o.decay_every}")
    _check(not (o.schedule == "ntasgd" and o.name != "sgd"), "optim.schedule",
           "ntasgd averages SGD iterates; set optim.name=sgd")
    _check(t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}")
    _check(t.checkpoint_minutes >= 0, "train.checkpoint_minutes",
           f"must be >= 0 minutes (0: no time-based checkpoints), got {t.checkpoint_minutes}")
    _check(t.threads is None or t.threads > 0, "train.threads",
           f"must be a positive number of CPU threads, or null for torch's default, got {t.threads}")
    for name in ("max_steps", "eval_every", "checkpoint_every", "patience"):
        _check(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    for name in ("keep_checkpoints", "log_every"):
        _check(getattr(t, name) > 0, f"train.{name}", f"must be positive, got {getattr(t, name)}")
    for name in ("ar", "tar"):
        _check(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
           f"{t.device!r} is not auto, cpu, cuda or cuda:N")
    if t.run_name is not None:
        _check(bool(t.run_name) and "/" not in t.run_name and t.run_name not in (".", ".."),
               "train.run_name", f"{t.run_name!r} must be a plain folder name")
    return cfg


def resolve_device(name: str):
    """``train.device`` as a torch.device: ``auto`` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device {name!r} asked for, but {count} CUDA device(s) are "
                              f"available; use cpu" + (" or cuda:0" if count else ""))
    return device


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.5'`` -> ``(['optim', 'lr'], 0.5)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value "
                          f"(e.g. train.epochs=2)")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write key.path=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: take it as a plain string
    return key.split("."), parsed


def apply_override(raw: dict, keys: list[str], value, schema=None) -> None:
    """Set ``raw[k0][k1]...`` = value, checking every key against ``schema`` (a dataclass,
    default :class:`Config`) first."""
    cls: Any = schema or Config
    node = raw
    for depth, key in enumerate(keys):
        path = ".".join(keys[: depth + 1])
        names = [f.name for f in dataclasses.fields(cls)]
        if key not in names:
            extra = did_you_mean(schema or Config, tuple(keys[:depth]), key)
            raise ConfigError(f"override of unknown config key '{path}'{extra}")
        tp = typing.get_type_hints(cls)[key]
        last = depth == len(keys) - 1
        if last:
            node[key] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override '{'.'.join(keys)}': '{path}' is a value, not a section")
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node, cls = node[key], tp


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``, section by section (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | Path, _chain: tuple = ()) -> dict:
    """The raw mapping of a recipe file; YAML errors come back with their line number.

    A recipe may start from others: ``base: ../char_ptb.yaml`` (a path relative to the recipe's
    own folder), or a list ``base: [../char_gal.yaml, char_scale.yaml]`` read in order, each
    laid over the previous one section by section, and this recipe's own keys over them all, so
    a derived recipe names only what it changes. Bases may chain; a cycle is an error.
    """
    raw = _read_one(path)
    if "base" not in raw:
        return raw
    bases = raw.pop("base")
    p = Path(path)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"recipe {str(p)!r}: base must be the path of another recipe, or a list "
                          f"of them (relative to {str(p.parent)!r}), got {bases!r}")
    chain = _chain + (p.resolve(),)
    merged: dict = {}
    for base in bases:  # later bases override earlier ones; the recipe's own keys override all
        base_path = (p.parent / base).resolve()
        if base_path in chain:
            raise ConfigError(f"recipe {str(p)!r}: base {base!r} leads back to "
                              f"{str(base_path)!r}; recipes cannot inherit in a cycle")
        if not base_path.is_file():
            raise ConfigError(f"recipe {str(p)!r}: base recipe {base!r} not found (looked for "
                              f"{str(base_path)!r}); the path is relative to the recipe's folder")
        merged = _merge(merged, read_recipe(base_path, chain))
    return _merge(merged, raw)


def _read_one(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file {str(p)!r} not found; pass a YAML file such as "
                          f"recipes/char_ptb.yaml")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"recipe file {str(p)!r} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"recipe {str(p)!r}:{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(p)!r} must be a mapping of sections (data, model, "
                          f"optim, train), got {type(raw).__name__}")
    return raw


# data.tokenizer, replaced by data.level (one field for the kind of token): its values as levels.
_TOKENIZER_LEVEL = {"word": "word", "char": "char", "sentencepiece": "subword"}


def as_current(saved: dict) -> dict:
    """A saved config (a checkpoint's, a run's config.yaml) as this code's schema reads it,
    flat (``{"section.key": value}``): renamed keys migrated and fields newer than the run at
    their defaults, which is what the run used. One that no longer validates is laid over the
    defaults as it stands."""
    try:
        return flat(config_from_dict(saved).to_dict())
    except ConfigError:
        return {**flat(Config().to_dict()), **flat(saved)}


def config_from_dict(raw: dict) -> Config:
    """A config from a mapping, such as a checkpoint's (older ones may hold ``data.tokenizer``)."""
    data = raw.get("data")
    if isinstance(data, dict) and "tokenizer" in data:
        data = dict(data)
        kind = data.pop("tokenizer")
        if kind is not None:
            data["level"] = _TOKENIZER_LEVEL.get(kind, kind)
        raw = {**raw, "data": data}
    return validate(build_section(Config, raw, ""))


def read_with_overrides(recipe: str | Path | None, overrides=(), schema=None) -> dict:
    """The raw mapping of a recipe (or ``{}``) with ``key.path=value`` overrides applied."""
    raw = read_recipe(recipe) if recipe is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value, schema)
    return raw


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a recipe, apply ``key.path=value`` overrides, and validate the result."""
    cfg = config_from_dict(read_with_overrides(recipe, overrides))
    if cfg.train.run_name is None and recipe is not None:
        cfg.train.run_name = Path(recipe).stem
    return cfg
