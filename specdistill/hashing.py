"""Content hashes: the one way every key, fingerprint and cache name in the project is made.

A key is the first 16 hex digits (64 bits) of a SHA-256: long enough that two different inputs
never meet in one run directory, short enough to read in a file name. What is hashed is *content*
(a JSON-able description, an array's bytes with its shape and dtype, a file's bytes), never a path
or a time, so a moved or copied run directory keeps its keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

KEY_LENGTH = 16


def _finish(digest: Any, length: int | None) -> str:
    text = digest.hexdigest()
    return text if length is None else text[:length]


def digest_json(obj: Any, length: int | None = KEY_LENGTH) -> str:
    """Hash of a JSON-able description (keys sorted; values JSON cannot spell are ``str``-ed)."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return _finish(hashlib.sha256(blob.encode()), length)


def digest_arrays(*arrays: np.ndarray, length: int | None = KEY_LENGTH) -> str:
    """Hash of arrays' contents, shapes and dtypes (the same values in another shape differ)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(repr((array.shape, str(array.dtype))).encode())
        digest.update(array.data)
    return _finish(digest, length)


def digest_file(path: str | os.PathLike, length: int | None = KEY_LENGTH) -> str:
    """Hash of a file's bytes, read in 16 MiB blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return _finish(digest, length)
