"""Small, learnable IDX datasets for tests, written with the standard library only (both environments use it)."""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def idx_bytes(shape: tuple[int, ...], values: bytes, magic_type: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, magic_type, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + values


def make_split(n: int, rng: random.Random, classes: int = 10, size: int = 28) -> tuple[bytes, bytes]:
    """Class c is a bright 6x6 square at a class-specific place on a noisy background."""
    images = bytearray()
    labels = bytearray()
    for i in range(n):
        label = i % classes
        pixels = bytearray(rng.randrange(0, 60) for _ in range(size * size))
        row, col = 2 + (label // 4) * 8, 2 + (label % 4) * 6
        for r in range(row, row + 6):
            for c in range(col, col + 6):
                pixels[r * size + c] = rng.randrange(180, 256)
        images += pixels
        labels.append(label)
    return bytes(images), bytes(labels)


def write_dataset(folder: Path, *, train: int = 300, test: int = 100, seed: int = 0, gz: bool = True,
                  size: int = 28, classes: int = 10) -> Path:
    """Write the four IDX files of a small synthetic dataset into ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        images, labels = make_split(n, rng, classes=classes, size=size)
        payloads = {f"{split}_images": idx_bytes((n, size, size), images), f"{split}_labels": idx_bytes((n,), labels)}
        for role, payload in payloads.items():
            name = NAMES[role] if gz else NAMES[role].removesuffix(".gz")
            (folder / name).write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return folder
