"""The on-disk cache of trained tokenizers and encoded splits, so a second run reads, not encodes.

Layout under the cache folder (``data.cache_dir``, else ``$LM_CACHE_DIR``, else ``~/.cache/flipout_lstm``)::

    tokenizers/<key>.json    a word/char vocabulary      key = SHA-256 of (tokenizer settings,
    tokenizers/<key>.model   a sentencepiece model             training split's content hash)
    encoded/<key>.bin        a split's ids, int32        key = SHA-256 of (tokenizer fingerprint,
    encoded/<key>.json       its token/line/char counts        split's content hash)

A split is encoded in a streaming pass: lines are read in chunks of :data:`CHUNK_LINES`,
encoded, and their ids appended to the ``.bin`` file, so memory holds one chunk of text at a
time, never the split. The ids are read back as a ``numpy.memmap``. Every file is written
under a temporary name and renamed into place, the ``.json`` last: an entry without its
``.json``, or whose ``.bin`` has the wrong size, is simply encoded again.

The raw character count stored with a split is ``sum(len(line) + 1)`` over its lines (lines
as defined in :mod:`flipout_lstm.data.sources`, counted in Unicode code points): every character of
the text, plus one for each line's end. It is the denominator of ``bpc_raw``.
"""
from __future__ import annotations

import hashlib
import json
import os
from itertools import islice
from pathlib import Path

import numpy as np

from flipout_lstm.errors import DataError
from flipout_lstm.fileio import atomic_write_bytes, atomic_writer

from .sources import SplitText
from .tokenizers import Tokenizer, make_tokenizer
from .vocab import Vocab

ENV_VAR = "LM_CACHE_DIR"
DEFAULT_DIR = "~/.cache/flipout_lstm"
CHUNK_LINES = 4096
FORMAT = 1
DTYPE = np.dtype("<i4")


def cache_root(cache_dir: str | None) -> Path:
    """``cache_dir`` if given, else ``$LM_CACHE_DIR``, else ``~/.cache/flipout_lstm``."""
    return Path(cache_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def digest(obj) -> str:
    """SHA-256 of an object's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _folder(root: Path, name: str) -> Path:
    path = root / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {path} ({exc.strerror or exc}); set "
                        f"data.cache_dir or {ENV_VAR} to a writable folder") from None
    return path


class Cache:
    """Tokenizers and encoded splits under ``root`` (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # --- tokenizers ---------------------------------------------------------------
    def tokenizer(self, settings: dict, train: SplitText, build) -> Tokenizer:
        """The cached tokenizer for ``settings`` trained on ``train``, else ``build(train)``
        (which returns a Tokenizer), stored for next time."""
        key = digest({"format": FORMAT, "settings": settings, "train": train.fingerprint()})
        folder = _folder(self.root, "tokenizers")
        kind = settings["kind"]
        path = folder / (f"{key}.model" if kind == "sentencepiece" else f"{key}.json")
        if path.is_file():
            try:
                if kind == "sentencepiece":
                    return make_tokenizer(kind, model=path.read_bytes())
                return make_tokenizer(kind, Vocab.load(path))
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal
                pass
        tok = build(train)
        try:
            if kind == "sentencepiece":
                atomic_write_bytes(path, tok.model_bytes())
            else:
                tok.vocab.save(path)
        except OSError as exc:
            raise DataError(f"cannot write to the cache folder {folder} ({exc.strerror or exc}); set "
                            f"data.cache_dir or {ENV_VAR} to a writable folder") from None
        return tok

    # --- encoded splits -----------------------------------------------------------
    def encoded(self, tokenizer: Tokenizer, text: SplitText) -> tuple[np.ndarray, dict]:
        """``(ids, info)``: the split's ids (a read-only memmap) and ``{"tokens", "lines",
        "chars"}``, encoded now only if no complete cache entry exists."""
        key = digest({"format": FORMAT, "tokenizer": tokenizer.fingerprint, "text": text.fingerprint()})
        folder = _folder(self.root, "encoded")
        bin_path, info_path = folder / f"{key}.bin", folder / f"{key}.json"
        info = self._read_info(info_path, bin_path)
        if info is None:
            info = self._encode(tokenizer, text, bin_path, info_path)
        if info["tokens"] == 0:
            raise DataError(f"{text.description} holds no text; check the corpus")
        return np.memmap(bin_path, dtype=DTYPE, mode="r", shape=(info["tokens"],)), info

    @staticmethod
    def _read_info(info_path: Path, bin_path: Path) -> dict | None:
        try:
            info = json.loads(info_path.read_text())
            if info.get("format") == FORMAT and bin_path.stat().st_size == info["tokens"] * DTYPE.itemsize:
                return info
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return None

    @staticmethod
    def _encode(tokenizer: Tokenizer, text: SplitText, bin_path: Path, info_path: Path) -> dict:
        tokens = lines = chars = 0
        try:
            with atomic_writer(bin_path) as fh:
                stream = iter(text.lines())
                while chunk := list(islice(stream, CHUNK_LINES)):
                    ids = tokenizer.encode_lines(chunk)
                    fh.write(np.frombuffer(ids, dtype=np.int32).astype(DTYPE, copy=False).tobytes())
                    tokens += len(ids)
                    lines += len(chunk)
                    chars += sum(map(len, chunk)) + len(chunk)
        except OSError as exc:
            raise DataError(f"cannot write to the cache folder {bin_path.parent} ({exc.strerror or exc}); "
                            f"set data.cache_dir or {ENV_VAR} to a writable folder") from None
        info = {"format": FORMAT, "tokens": tokens, "lines": lines, "chars": chars,
                "text": text.description, "tokenizer": tokenizer.kind}
        atomic_write_bytes(info_path, json.dumps(info).encode())
        return info


__all__ = ["ENV_VAR", "Cache", "cache_root", "digest"]
