"""Strict reader and writer for the IDX format of MNIST-style datasets (gzipped or raw)."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .core import StepError

_UBYTE = 0x08
_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "16-bit integer", 0x0C: "32-bit integer",
          0x0D: "32-bit float", 0x0E: "64-bit float"}  # the IDX format's value types


class IdxFormatError(StepError):
    """An IDX file whose header or length is not what the format requires.

    ``reason``: what is wrong, without the file's path or the remedy (for a message about a download).
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def decompress(path: Path, raw: bytes) -> bytes:
    """Return the IDX payload of a file's bytes, un-gzipping when it is gzipped."""
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            reason = f"gzip stream is corrupt or truncated ({exc})"
            raise IdxFormatError(f"{path}: {reason}; replace it with a complete copy (a file of prep's download "
                                 "cache: delete it, and prep downloads it again)", reason=reason) from exc
    return raw


def parse(path: Path, payload: bytes, *, expect_ndim: int) -> np.ndarray:
    """Parse one IDX payload; every header field and the exact length are checked."""
    def error(reason: str) -> IdxFormatError:
        return IdxFormatError(f"{path}: {reason}", reason=reason)

    if len(payload) < 4:
        raise error(f"{len(payload)} bytes is too short for an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", payload[:4])
    if zero != 0 or dtype != _UBYTE or ndim != expect_ndim:
        kind = "labels (magic 0x00000801)" if expect_ndim == 1 else "images (magic 0x00000803)"
        message = f"wrong magic number 0x{payload[:4].hex()}; expected IDX {kind}"
        if zero == 0 and dtype == _UBYTE and {ndim, expect_ndim} == {1, 3}:  # the other file of the pair
            found = "labels" if ndim == 1 else "images"
            message += f": this is an IDX {found} file; are the images and labels files swapped?"
        elif zero == 0 and dtype in _TYPES:  # a valid IDX header, of values or dimensions not supported
            shape, values = (("N", "class numbers 0..K-1") if expect_ndim == 1 else
                             ("N x H x W", "grayscale pixels 0..255 (RGB converted to one channel, floats scaled "
                                           "and rounded)"))
            message += (f": this file holds {_TYPES[dtype]} values in {ndim} dimension(s); only unsigned bytes "
                        f"({shape}) are supported: write {values} as uint8")
        raise error(message)
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise error(f"header truncated ({len(payload)} bytes, needs {header})")
    dims = struct.unpack(f">{ndim}I", payload[4:header])
    expected = header + math.prod(dims)  # Python integers: a crafted header cannot overflow the check
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "has trailing bytes"
        raise error(f"file {what}: dimensions {list(dims)} need {expected} bytes, found {len(payload)}")
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims)


def encode(array: np.ndarray) -> bytes:
    """Serialize a uint8 array as an IDX payload (used by tests and tools that make small datasets)."""
    if array.dtype != np.uint8:
        raise ValueError("IDX writer supports uint8 only")
    return struct.pack(">HBB", 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
