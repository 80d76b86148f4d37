"""idx: the strict IDX reader accepts well-formed files and names the file in every rejection."""

from __future__ import annotations

import gzip
from pathlib import Path

import idxdata
import numpy as np
import pytest

from mlsteps import idx

PATH = Path("/data/some-folder/train-images-idx3-ubyte.gz")


def test_valid_images_parse_to_count_height_width() -> None:
    values = bytes(range(2 * 3 * 4))
    array = idx.parse(PATH, idxdata.idx_bytes((2, 3, 4), values), expect_ndim=3)
    assert array.shape == (2, 3, 4)
    assert array.dtype == np.uint8
    assert array.tobytes() == values


def test_valid_labels_parse_to_one_dimension() -> None:
    array = idx.parse(PATH, idxdata.idx_bytes((5,), bytes([3, 1, 4, 1, 5])), expect_ndim=1)
    assert array.shape == (5,)
    assert array.tolist() == [3, 1, 4, 1, 5]


def test_encode_then_parse_round_trips() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(idx.parse(PATH, idx.encode(array), expect_ndim=3), array)


def test_decompress_passes_raw_idx_through_and_ungzips_gzip() -> None:
    payload = idxdata.idx_bytes((3,), bytes([0, 1, 2]))
    assert idx.decompress(PATH, payload) == payload
    assert idx.decompress(PATH, gzip.compress(payload)) == payload


@pytest.mark.parametrize(("payload", "expect_ndim", "words"), [
    (idxdata.idx_bytes((2, 2, 2), bytes(32), magic_type=0x0D), 3,
     r"holds 32-bit float values in 3 dimension\(s\); only unsigned bytes \(N x H x W\) are supported: write "
     r"grayscale pixels 0..255 \(RGB converted to one channel, floats scaled and rounded\) as uint8"),
    (idxdata.idx_bytes((2, 2, 2, 3), bytes(24)), 3, r"holds unsigned byte values in 4 dimension\(s\)"),
    (idxdata.idx_bytes((2,), bytes(8), magic_type=0x0C), 1, r"32-bit integer values .* write class numbers 0..K-1"),
], ids=["float-images", "rgb-images", "int32-labels"])
def test_an_idx_file_of_another_type_or_shape_says_what_it_holds_and_how_to_convert_it(payload, expect_ndim, words):
    with pytest.raises(idx.IdxFormatError, match=words):
        idx.parse(PATH, payload, expect_ndim=expect_ndim)


@pytest.mark.parametrize(
    ("payload", "expect_ndim", "message"),
    [
        (idxdata.idx_bytes((2,), bytes(2)), 3, "wrong magic"),
        (idxdata.idx_bytes((2, 2, 2), bytes(8)), 1, "wrong magic"),
        (idxdata.idx_bytes((2, 2, 2), bytes(8), magic_type=0x09), 3, "wrong magic"),
        (b"\x01\x00" + idxdata.idx_bytes((2, 2, 2), bytes(8))[2:], 3, "wrong magic"),
        (b"\x00\x00\x08", 3, "too short"),
        (idxdata.idx_bytes((2, 2, 2), bytes(8))[:10], 3, "header truncated"),
        (idxdata.idx_bytes((2, 2, 2), bytes(7)), 3, "truncated"),
        (idxdata.idx_bytes((4,), bytes(2)), 1, "truncated"),
        (idxdata.idx_bytes((2, 2, 2), bytes(9)), 3, "trailing bytes"),
        (idxdata.idx_bytes((2,), bytes(3)), 1, "trailing bytes"),
    ],
    ids=["labels-magic-for-images", "images-magic-for-labels", "signed-byte-type", "nonzero-first-bytes",
         "shorter-than-header", "dimensions-cut-off", "truncated-images", "truncated-labels",
         "trailing-bytes-images", "trailing-bytes-labels"],
)
def test_malformed_payload_raises_idx_format_error_naming_file(payload: bytes, expect_ndim: int,
                                                               message: str) -> None:
    with pytest.raises(idx.IdxFormatError, match=message) as caught:
        idx.parse(PATH, payload, expect_ndim=expect_ndim)
    assert str(PATH) in str(caught.value)


@pytest.mark.parametrize(
    "raw",
    [
        gzip.compress(idxdata.idx_bytes((50,), bytes(50)))[:-12],
        gzip.compress(idxdata.idx_bytes((50,), bytes(50)))[:12],
        b"\x1f\x8b" + b"not a gzip stream at all",
    ],
    ids=["cut-before-trailer", "cut-inside-header", "garbage-after-magic"],
)
def test_corrupt_gzip_raises_idx_format_error_naming_file(raw: bytes) -> None:
    with pytest.raises(idx.IdxFormatError, match="gzip stream is corrupt") as caught:
        idx.decompress(PATH, raw)
    assert str(PATH) in str(caught.value)


def test_idx_format_error_is_a_step_error() -> None:
    from mlsteps.core import StepError

    assert issubclass(idx.IdxFormatError, StepError)
