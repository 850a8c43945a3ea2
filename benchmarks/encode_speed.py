"""Encoding throughput of the streaming corpus cache, in MB of text per second.

    python benchmarks/encode_speed.py [--mb 100] [--tokenizers word,char,sentencepiece]
                                      [--vocab-size 8000] [--workdir DIR] [--keep]

Writes a synthetic text file of ``--mb`` megabytes (words drawn from a Zipf-like
distribution over a 50k-word vocabulary, 5 to 40 words per line; ASCII, so 1 MB = 10^6
characters), then for each tokenizer builds it on the file (the word vocabulary, or a
sentencepiece model, which is not timed) and times :meth:`flipout_lstm.data.cache.Cache.encoded`
writing the ids to a fresh cache folder, and then reading them back from the cache (the
second run's cost). sentencepiece is trained on the first ``--sp-lines`` lines only (training
is not what is measured). Prints a markdown table: seconds, MB/s, millions of tokens per
second, and how far the resident memory rose above its level at the start of encoding
(sampled every 20 ms from /proc/self/statm), which stays near one chunk of text, far below
the file's size.
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flipout_lstm.data.cache import Cache  # noqa: E402
from flipout_lstm.data.sources import TextFileSplit  # noqa: E402
from flipout_lstm.data.tokenizers import build_vocab, make_tokenizer, train_sentencepiece  # noqa: E402


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A text file of about ``megabytes`` MB; returns its size in bytes."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(50_000)]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    target, size = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as fh:
        while size < target:
            block = rng.choices(words, weights, k=20_000)
            lines, i = [], 0
            while i < len(block):
                n = rng.randint(5, 40)
                lines.append(" ".join(block[i:i + n]) + "\n")
                i += n
            text = "".join(lines)
            fh.write(text)
            size += len(text)
    return path.stat().st_size


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The highest resident set size seen while the ``with`` block runs (a sampling thread)."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.growth = self.peak - self.start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=100.0, help="size of the generated text (default 100)")
    p.add_argument("--tokenizers", default="word,char,sentencepiece")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece pieces (default 8000)")
    p.add_argument("--sp-lines", type=int, default=200_000,
                   help="lines sentencepiece is trained on (default 200000)")
    p.add_argument("--workdir", default=None, help="folder for the text and the cache (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="encode_speed."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        text_path = work / "corpus.txt"
        tic = time.perf_counter()
        size = write_corpus(text_path, args.mb)
        print(f"generated {size / 1e6:.1f} MB in {time.perf_counter() - tic:.1f} s: {text_path}")
        split = TextFileSplit(text_path, "benchmark")
        rows = []
        for kind in args.tokenizers.split(","):
            if kind == "sentencepiece":
                sample = itertools.islice(split.lines(), args.sp_lines)
                tok = make_tokenizer(kind, model=train_sentencepiece(sample, args.vocab_size, "unigram"))
            else:
                tok = make_tokenizer(kind, build_vocab(kind, split.lines()))
            cache = Cache(work / f"cache-{kind}")
            with PeakRSS() as memory:
                tic = time.perf_counter()
                ids, info = cache.encoded(tok, split)
                seconds = time.perf_counter() - tic
            grown = memory.growth
            tic = time.perf_counter()
            again, _ = Cache(work / f"cache-{kind}").encoded(tok, split)
            reread = time.perf_counter() - tic
            assert len(again) == len(ids) == info["tokens"]
            rows.append((kind, len(tok), seconds, size / 1e6 / seconds, info["tokens"] / 1e6 / seconds,
                         grown, reread))
            del ids, again
        print(f"\n{size / 1e6:.0f} MB of text, {info['lines']:,} lines, one process, "
              f"{sys.platform}, python {sys.version.split()[0]}\n")
        print("| tokenizer | vocabulary | encode s | MB/s | M tokens/s | RSS rise MB | cached re-read s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for kind, vocab, seconds, mbs, mtoks, grown, reread in rows:
            print(f"| {kind} | {vocab:,} | {seconds:.1f} | {mbs:.1f} | {mtoks:.2f} | {grown:.0f} | {reread:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
