"""Seeds derived from a run's seed: one hash, so that derived streams never collide by accident."""
from __future__ import annotations

import hashlib


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts``: the first 8 bytes (little-endian) of SHA-256 of
    ``"p0:p1:..."``. A hash rather than ``seed + k`` so that neighbouring seeds do not share
    streams (seed 1's epoch 2 is not seed 2's epoch 1) and no derived stream is the one that
    drew the initial weights."""
    text = ":".join(str(int(p)) if isinstance(p, (int, bool)) else str(p) for p in parts)
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (NumPy takes 32 bits)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
