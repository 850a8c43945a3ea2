"""Locating, downloading and checking the Penn Treebank word files.

The corpus is Mikolov's preprocessed PTB as shipped in ``simple-examples.tgz``:
three UTF-8 (in fact ASCII) text files ``ptb.{train,valid,test}.txt``, one
sentence per line. Every line starts with a space and ends with ``" \\n"``, e.g.
``" aer banknote berlitz ... \\n"``; words are separated by single spaces, rare
words are ``<unk>`` and numbers are ``N``.

Where the files live (:func:`resolve_root`): the explicit ``root`` (the recipe's
``data.root``) if given, else the environment variable ``LM_DATA_ROOT``, else
``data/ptb``; relative paths are taken against the current working directory.

:func:`prepare_ptb` fetches the tarball only when a file is missing, takes exactly
the three members ``simple-examples/data/ptb.{train,valid,test}.txt`` (no other
member or path of the archive is ever written), checks their SHA-256 against
:data:`PTB_SHA256` *before* writing anything, and writes each file atomically
(temporary file in the same folder, ``fsync``, ``os.replace``), so an interrupted
or failed download never leaves a partial corpus file behind.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Mapping

from flipout_lstm.errors import DataError, one_line, with_option
from flipout_lstm.fileio import atomic_write_bytes

PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
"""Canonical location of Mikolov's ``simple-examples.tgz``."""

SPLITS = ("train", "valid", "test")
"""The three splits, in the order they are read."""

PTB_SHA256: dict[str, str] = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}
"""SHA-256 of the three word files (file name -> hex digest)."""

ENV_VAR = "LM_DATA_ROOT"
DEFAULT_ROOT = "data/ptb"
ARCHIVE_DIR = "simple-examples/data"
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # the real train file is 5.1 MB
_CHUNK = 1 << 16


def split_file(split: str) -> str:
    """File name of a split: ``'train'`` -> ``'ptb.train.txt'``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"ptb.{split}.txt"


def root_origin(root: str | os.PathLike | None) -> str:
    """Which setting chose the data folder, in lookup order: ``"data.root"``, ``"env"``
    (``$LM_DATA_ROOT``) or ``"default"`` (``data/ptb``)."""
    if root is not None and str(root) != "":
        return "data.root"
    return "env" if os.environ.get(ENV_VAR) else "default"


def _setting(origin: str | None) -> str:
    """The setting to change, named so that the advice follows the lookup order (data.root >
    $LM_DATA_ROOT > data/ptb) and never suggests one that the setting in force overrides."""
    if origin == "data.root":
        return f"data.root (which takes precedence over ${ENV_VAR})"
    if origin == "env":
        return f"${ENV_VAR} (or data.root, which takes precedence)"
    return f"data.root or ${ENV_VAR} (data.root takes precedence)"


# The advice to download, for train.py; a command that cannot download leaves it out (for_command).
DOWNLOAD_HINT = " (or set data.download=true to fetch them)"


def for_command(exc: DataError, root_option: str) -> DataError:
    """``exc``'s advice in the terms of a command that takes no recipe (evaluate.py, the
    gradient-variance experiment): its own option for the folder where the advice names the
    recipe key ``data.root``, and no advice to set ``data.download``, which it cannot take."""
    return with_option(DataError(str(exc).replace(DOWNLOAD_HINT, "")), "data.root", root_option)


def _where_hint(root: Path, origin: str | None = None) -> str:
    names = ", ".join(split_file(s) for s in SPLITS)
    return f"put {names} in {root}, or set {_setting(origin)} to the folder that holds them"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data folder: ``root`` if given, else ``$LM_DATA_ROOT``, else ``data/ptb``.

    Relative paths are resolved against the current working directory; ``~`` is
    expanded. The folder need not exist.
    """
    if root is None or str(root) == "":
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    path = Path(root).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    return path


def read_split_text(root: str | os.PathLike, split: str, origin: str | None = None) -> str:
    """The text of ``ptb.<split>.txt`` in ``root``, checked to be present, non-empty UTF-8.

    Raises :class:`DataError` (one line naming the file and the fix) if the file is
    missing, unreadable, empty (or whitespace only) or not valid UTF-8. ``origin``
    (:func:`root_origin`) says which setting chose ``root``, for the advice.
    """
    root = Path(root)
    path = root / split_file(split)
    if not path.is_file():
        raise DataError(f"PTB file {path} is missing; {_where_hint(root, origin)}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read PTB file {path} ({one_line(exc)}); check its permissions") from exc
    return _decode_checked(raw, path, origin)


def _decode_checked(raw: bytes, path: Path, origin: str | None = None) -> str:
    if not raw.strip():
        raise DataError(
            f"PTB file {path} is empty; delete it and run again to re-download it, "
            f"or {_where_hint(path.parent, origin)}"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"PTB file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f"delete it and run again to re-download it, or {_where_hint(path.parent, origin)}"
        ) from exc


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _download(url: str, dest, timeout: float, hint: str) -> None:
    """Stream ``url`` into the open binary file ``dest`` with a tqdm progress bar."""
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc="simple-examples.tgz", disable=None, leave=False) as bar:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    dest.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DataError(
            f"could not download the PTB corpus from {url} (HTTP {exc.code} {one_line(exc.reason)}); "
            f"{hint}"
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"could not download the PTB corpus from {url} ({one_line(reason)}); {hint}"
        ) from exc


def _extract_members(archive: Path, names: list[str], url: str, hint: str) -> dict[str, bytes]:
    """Read exactly ``simple-examples/data/<name>`` for each name; nothing else is touched."""
    wanted = {f"{ARCHIVE_DIR}/{n}": n for n in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name not in wanted or wanted[name] in found:
                    continue
                if not member.isfile():
                    raise DataError(
                        f"archive from {url} holds {member.name} but not as a regular file; {hint}"
                    )
                if member.size > MAX_MEMBER_BYTES:
                    raise DataError(
                        f"archive from {url} holds an implausibly large {member.name} "
                        f"({member.size} bytes); {hint}"
                    )
                fh = tar.extractfile(member)
                if fh is None:  # pragma: no cover - isfile() members always have data
                    continue
                found[wanted[name]] = fh.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"download from {url} is not a valid .tgz archive ({one_line(exc)}); {hint}"
        ) from exc
    missing = [f"{ARCHIVE_DIR}/{n}" for n in names if n not in found]
    if missing:
        raise DataError(
            f"archive from {url} lacks {', '.join(missing)}; {hint}"
        )
    return found


def prepare_ptb(
    root: str | os.PathLike | None,
    url: str | None = PTB_URL,
    download: bool = True,
    timeout: float = 60,
    expected_sha256: Mapping[str, str] | None = None,
) -> Path:
    """Make sure the three PTB word files are in the data folder and return that folder.

    ``root`` is resolved by :func:`resolve_root`. Files already present are checked to
    be non-empty UTF-8 (their checksums are not enforced, so a deliberately edited
    corpus still loads). If any is missing and ``download`` is true, ``url`` is fetched
    (``timeout`` seconds per socket operation), the missing files are taken from the
    archive, verified against ``expected_sha256`` (default :data:`PTB_SHA256`; tests
    pass their own for a synthetic corpus) and written atomically. Every failure
    (offline, HTTP error, not a tarball, members missing, checksum mismatch) raises a
    one-line :class:`DataError` naming the folder and the setting that chose it (the advice
    follows the lookup order), and leaves no folder behind that it created.
    """
    url = url or PTB_URL  # None: Mikolov's archive
    sums = dict(PTB_SHA256 if expected_sha256 is None else expected_sha256)
    path, origin = resolve_root(root), root_origin(root)
    names = [split_file(s) for s in SPLITS]
    missing = [n for n in names if not (path / n).is_file()]
    if missing and not download:
        raise DataError(
            f"PTB files missing from {path}: {', '.join(missing)}; {_where_hint(path, origin)}"
            f"{DOWNLOAD_HINT}"
        )
    if missing:
        created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
        try:
            _fetch(path, missing, url, timeout, sums, origin)
        except BaseException:
            for folder in created:  # a failed download leaves no empty folder behind
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty (or not ours to remove): keep it and its parents
            raise
    for split in SPLITS:
        read_split_text(path, split, origin)
    return path


def _fetch(path: Path, missing: list[str], url: str, timeout: float, sums: Mapping[str, str],
           origin: str | None = None) -> None:
    hint = _where_hint(path, origin)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path, prefix=".simple-examples.", suffix=".tgz.part")
    except OSError as exc:
        raise DataError(
            f"cannot write to the data folder {path} ({one_line(exc)}); "
            f"set {_setting(origin)} to a writable folder"
        ) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            _download(url, fh, timeout, hint)
        contents = _extract_members(tmp, missing, url, hint)
        for name in missing:  # verify all before writing any
            got = sha256_bytes(contents[name])
            want = sums.get(name)
            if want is None:
                raise DataError(f"no expected SHA-256 for {name}; pass it in expected_sha256")
            if got != want.lower():
                raise DataError(
                    f"checksum mismatch for {name} downloaded from {url}: expected sha256 "
                    f"{want[:12]}..., got {got[:12]}...; {hint}"
                )
        for name in missing:
            _decode_checked(contents[name], path / name, origin)
            atomic_write_bytes(path / name, contents[name])
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


__all__ = [
    "PTB_URL", "PTB_SHA256", "SPLITS", "ENV_VAR", "prepare_ptb", "resolve_root", "root_origin",
    "read_split_text", "split_file", "sha256_bytes",
]
