"""Token <-> id mapping with an end-of-line token.

Order (deterministic): ``<eos>`` has id 0, then every other token in order of its
first occurrence in the training split (reading lines top to bottom, tokens left to
right). ``<unk>`` is an ordinary token of the word corpus (Mikolov's files already
contain it); when present, out-of-vocabulary tokens map to it, otherwise encoding an
unknown token is a :class:`DataError` naming the token, the file and the line.

Encoding produces one flat stream: the ids of line 1, ``<eos>``, the ids of line 2,
``<eos>``, ... For speed (5M character tokens) the lookups run through ``map`` over
a ``dict`` and the ids are collected in an ``array('q')`` that torch wraps without a
per-element conversion.
"""
from __future__ import annotations

import json
import os
from array import array
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from flipout_lstm.errors import DataError
from flipout_lstm.fileio import atomic_write_bytes

EOS = "<eos>"
UNK = "<unk>"
# The file format's name, fixed since the package was called lm: vocab.json files and every
# checkpoint written since then carry it, and still load.
_FORMAT = "lm.vocab"
_VERSION = 1


class Vocab:
    """An ordered list of distinct tokens (``itos``) and its inverse (``stoi``).

    ``eos`` is always ``'<eos>'`` and must be in the vocabulary; ``unk`` is ``'<unk>'``
    if the vocabulary has it, else ``None``.
    """

    eos: str = EOS

    def __init__(self, itos: Sequence[str]):
        itos = list(itos)
        bad = [t for t in itos if not isinstance(t, str) or t == ""]
        if bad:
            raise DataError(f"vocabulary has a token that is not a non-empty string: {bad[0]!r}; rebuild it")
        stoi = {t: i for i, t in enumerate(itos)}
        if len(stoi) != len(itos):
            seen: set[str] = set()
            dup = next(t for t in itos if t in seen or seen.add(t))
            raise DataError(f"vocabulary lists token {dup!r} twice; rebuild it from the training split")
        if EOS not in stoi:
            raise DataError(f"vocabulary lacks the end-of-line token {EOS!r}; rebuild it from the training split")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = stoi

    # --- basic properties -------------------------------------------------
    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __hash__(self) -> int:
        return hash(tuple(self.itos))

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, unk={self.unk!r})"

    @property
    def eos_id(self) -> int:
        return self.stoi[EOS]

    @property
    def unk(self) -> str | None:
        return UNK if UNK in self.stoi else None

    @property
    def unk_id(self) -> int | None:
        return self.stoi.get(UNK)

    # --- construction -----------------------------------------------------
    @classmethod
    def build(cls, lines_of_tokens: Iterable[Iterable[str]]) -> "Vocab":
        """``<eos>`` first, then the tokens in order of first occurrence.

        A line may be any iterable of tokens, including a ``str`` (its characters).
        """
        first_seen = dict.fromkeys(chain.from_iterable(lines_of_tokens))
        first_seen.pop(EOS, None)
        return cls([EOS, *first_seen])

    # --- encoding ---------------------------------------------------------
    def encode(self, lines_of_tokens: Iterable[Iterable[str]], *, source: str) -> torch.Tensor:
        """One 1-D LongTensor: each line's ids followed by ``eos_id``.

        Unknown tokens become ``unk_id`` if the vocabulary has ``<unk>``; otherwise a
        :class:`DataError` names the first unknown token, ``source`` and its 1-based line.
        """
        lines = lines_of_tokens if isinstance(lines_of_tokens, (list, tuple)) else list(lines_of_tokens)
        eos_line = (EOS,)
        tokens = chain.from_iterable(chain.from_iterable((line, eos_line) for line in lines))
        default = self.unk_id if self.unk_id is not None else -1
        ids = array("q", map(self.stoi.get, tokens, repeat(default)))
        out = torch.frombuffer(ids, dtype=torch.int64).clone() if len(ids) else torch.empty(0, dtype=torch.long)
        if default == -1:
            bad = (out < 0).nonzero()
            if len(bad):
                self._raise_oov(lines, int(bad[0, 0]), source)
        return out

    def _raise_oov(self, lines: Sequence[Iterable[str]], pos: int, source: str) -> None:
        for lineno, line in enumerate(lines, start=1):
            toks = list(line)
            if pos <= len(toks):  # position len(toks) is the line's <eos>, always known
                raise DataError(
                    f"token {toks[pos]!r} in {source} line {lineno} is not in the vocabulary, which has no "
                    f"{UNK!r}; rebuild the vocabulary from this corpus or fix the file"
                )
            pos -= len(toks) + 1
        raise AssertionError("unknown-token position beyond the stream")  # pragma: no cover

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens for ``ids`` (a tensor or any iterable of ints)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self.itos[i] for i in ids]

    # --- persistence ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"format": "lm.vocab", "version": 1, "itos": [...]}``."""
        return {"format": _FORMAT, "version": _VERSION, "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "vocabulary") -> "Vocab":
        """Inverse of :meth:`to_dict`; a malformed dict is a :class:`DataError`."""
        if not isinstance(d, dict) or not isinstance(d.get("itos"), list):
            raise DataError(f"{source} is not a saved vocabulary (no 'itos' list); rebuild it from the training split")
        if d.get("format", _FORMAT) != _FORMAT or d.get("version", _VERSION) != _VERSION:
            raise DataError(
                f"{source} has format {d.get('format')!r} version {d.get('version')!r}, expected "
                f"{_FORMAT!r} version {_VERSION}; rebuild it from the training split"
            )
        try:
            return cls(d["itos"])
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON, atomically (temp file, fsync, os.replace)."""
        path = Path(path)
        data = json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8")
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        """Read a file written by :meth:`save`; missing or malformed -> :class:`DataError`."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"vocabulary file {path} does not exist; check the path or rebuild it") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = " ".join(str(exc).split())
            raise DataError(f"vocabulary file {path} is unreadable or not JSON ({msg}); rebuild it") from None
        return cls.from_dict(d, source=f"vocabulary file {path}")


__all__ = ["EOS", "UNK", "Vocab"]
