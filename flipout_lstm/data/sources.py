"""Where a corpus's text comes from: the lines of each split, streamed, and a content hash.

Three sources (``data.source``):

* ``ptb`` -- Mikolov's ``ptb.{train,valid,test}.txt`` (:mod:`flipout_lstm.data.ptb` finds or fetches them).
* ``text`` -- any three UTF-8 plain-text files ``data.train``, ``data.valid``, ``data.test``.
* ``hf`` -- a dataset read through the ``datasets`` library (memory-mapped Arrow): a
  ``save_to_disk`` folder (``data.path``), or a hub dataset ``data.name`` / ``data.config``
  (downloaded when online, from the local ``datasets`` cache when offline), splits
  ``data.train_split`` / ``valid_split`` / ``test_split``, text column ``data.text_field``.

What a *line* is (it decides the ``<eos>`` tokens and the raw character count):

* a text file is split on newlines (``\\r\\n`` and ``\\r`` read as ``\\n``); the newline is not
  part of the line; a final newline does not open an empty last line, empty lines inside the
  file are lines;
* a dataset row's text has one trailing ``\\n`` removed and is then split on ``\\n``: ``"a\\n"``
  is the line ``"a"``, ``""`` one empty line, ``"a\\nb"`` two lines. (WikiText's rows are the
  lines of its files, so this reproduces the files' lines, blank ones included.)

Lines are yielded one at a time, never the whole split: memory stays bounded whatever the
size of the text. :meth:`SplitText.fingerprint` identifies the content (SHA-256 of a file's
bytes; the Arrow fingerprint of a dataset split plus its column) for the encoding cache.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

from flipout_lstm.errors import DataError, one_line

from .ptb import SPLITS, prepare_ptb, split_file

SOURCES = ("ptb", "text", "hf")
_HASH_CHUNK = 1 << 20


class SplitText:
    """One split's text: :meth:`lines` streams it, :meth:`fingerprint` names its content."""

    description: str

    def lines(self) -> Iterator[str]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError


class TextFileSplit(SplitText):
    """A UTF-8 plain-text file, one document or sentence per line."""

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path).expanduser()
        self.key = key  # the config key that named the file, for error messages
        self.description = str(self.path)
        if not self.path.is_file():
            raise DataError(f"{key} file {self.path} not found; set {key} to an existing plain-text file")
        if self.path.stat().st_size == 0:
            raise DataError(f"{key} file {self.path} is empty; point {key} at a file with text")

    def lines(self) -> Iterator[str]:
        lineno = 0
        try:
            with open(self.path, encoding="utf-8", newline=None) as fh:
                for lineno, line in enumerate(fh, start=1):
                    yield line[:-1] if line.endswith("\n") else line
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.key} file {self.path} is not UTF-8 text (near line {lineno + 1}: "
                            f"{one_line(exc.reason)}); convert it to UTF-8") from None
        except OSError as exc:
            raise DataError(f"cannot read {self.key} file {self.path} ({exc.strerror or exc}); "
                            f"check its permissions") from None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        try:
            with open(self.path, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise DataError(f"cannot read {self.key} file {self.path} ({exc.strerror or exc}); "
                            f"check its permissions") from None
        return "file:" + digest.hexdigest()


def row_lines(text: str | None) -> list[str]:
    """The lines of one dataset row (see the module docstring); ``None`` counts as ``""``."""
    text = text or ""
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n")


class DatasetSplit(SplitText):
    """One split of a ``datasets.Dataset`` (Arrow, memory-mapped), its text in one column."""

    BATCH_ROWS = 1000

    def __init__(self, dataset, field: str, description: str):
        if field not in dataset.column_names:
            raise DataError(f"{description} has no column {field!r} (columns: "
                            f"{', '.join(dataset.column_names)}); set data.text_field to the text column")
        dtype = getattr(dataset.features[field], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise DataError(f"{description} column {field!r} holds {dataset.features[field]}, not text; "
                            f"set data.text_field to a string column")
        self.dataset = dataset.select_columns([field])
        self.field = field
        self.description = description

    def lines(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=self.BATCH_ROWS):
            for text in batch[self.field]:
                yield from row_lines(text)

    def fingerprint(self) -> str:
        # datasets derives the fingerprint from the data files (hub/cache) or stores it with a
        # save_to_disk folder; it changes whenever the content does.
        return f"hf:{self.dataset._fingerprint}:{self.field}"


# ----------------------------------------------------------------------------- opening


def open_ptb(dc) -> dict[str, SplitText]:
    root = prepare_ptb(dc.root, dc.url, download=dc.download)
    return {s: TextFileSplit(root / split_file(s), f"PTB {s}") for s in SPLITS}


def open_text(dc) -> dict[str, SplitText]:
    return {s: TextFileSplit(getattr(dc, s), f"data.{s}") for s in SPLITS}


def _hf_names(dc) -> dict[str, str]:
    return {"train": dc.train_split, "valid": dc.valid_split, "test": dc.test_split}


def _cache_hint() -> str:
    import datasets.config

    return str(datasets.config.HF_DATASETS_CACHE)


def open_hf(dc, splits=SPLITS) -> dict[str, SplitText]:
    """The splits of a ``save_to_disk`` folder (``data.path``) or of hub dataset ``data.name``."""
    import datasets

    names = _hf_names(dc)
    if dc.path:
        folder = Path(dc.path).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.path {folder} is not a folder; point it at a folder written by "
                            f"DatasetDict.save_to_disk")
        try:
            loaded = datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(f"data.path {folder} is not a dataset saved with save_to_disk "
                            f"({one_line(exc)}); save one with DatasetDict.save_to_disk") from None
        if not isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"data.path {folder} holds a single Dataset, not a DatasetDict with the "
                            f"splits {', '.join(names[s] for s in splits)}; save a DatasetDict")
        missing = [names[s] for s in splits if names[s] not in loaded]
        if missing:
            raise DataError(f"data.path {folder} has no split {missing[0]!r} (it has "
                            f"{', '.join(loaded)}); set data.train_split/valid_split/test_split")
        return {s: DatasetSplit(loaded[names[s]], dc.text_field, f"{folder} split {names[s]!r}")
                for s in splits}
    label = repr(dc.name) + (f" (config {dc.config!r})" if dc.config else "")
    out = {}
    for s in splits:
        try:
            ds = datasets.load_dataset(dc.name, dc.config, split=names[s])
        except ConnectionError as exc:
            raise DataError(
                f"dataset {label} is not in the local datasets cache ({_cache_hint()}) and cannot be "
                f"downloaded ({one_line(exc)}); run once with a network connection (without "
                f"HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), or save it with save_to_disk and set "
                f"data.path=FOLDER") from None
        except ValueError as exc:
            raise DataError(f"dataset {label}: split {names[s]!r} cannot be loaded ({one_line(exc)}); "
                            f"set data.{s}_split to one of its splits") from None
        except (FileNotFoundError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
            raise DataError(f"dataset {label} cannot be loaded ({one_line(exc)}); check data.name "
                            f"and data.config, or save it with save_to_disk and set "
                            f"data.path=FOLDER") from None
        out[s] = DatasetSplit(ds, dc.text_field, f"dataset {label} split {names[s]!r}")
    return out


def open_splits(dc, splits=SPLITS) -> dict[str, SplitText]:
    """The requested splits (names from :data:`flipout_lstm.data.ptb.SPLITS`) of ``data.source``."""
    if dc.source == "ptb":
        found = open_ptb(dc)
    elif dc.source == "text":
        found = open_text(dc)
    elif dc.source == "hf":
        return open_hf(dc, splits)
    else:  # validate() rejects it first; kept for direct callers
        raise DataError(f"unknown data.source {dc.source!r}; use one of {', '.join(SOURCES)}")
    return {s: found[s] for s in splits}


__all__ = ["SOURCES", "SplitText", "TextFileSplit", "DatasetSplit", "row_lines", "open_splits"]
