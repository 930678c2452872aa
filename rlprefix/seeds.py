"""Every seed derived from a user's seed comes from `derive_seed`: one stable hash of named parts.

Arithmetic such as `seed * 1_000_003 + step` lets two different (seed, step) pairs meet on one stream; a hash of
the parts, with a name saying what the stream is for, does not.
"""
from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed (a valid torch / NumPy seed) from `parts`, e.g. `derive_seed("ppo/row", seed, step, row)`.

    blake2b of the parts' repr: the same on every run, process and Python version (unlike `hash()`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
