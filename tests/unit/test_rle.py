"""Tests for the pure-numpy COCO RLE codec of the light client (biprompt_client.rle).

The client package lives in clients/python; it must be importable (installed, or on
PYTHONPATH). Tests that compare against pycocotools are skipped when it is not installed.
"""

from __future__ import annotations

import timeit

import numpy as np
import pytest
from biprompt_client import rle


def _random_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random masks of several textures: noise of any density, blobs, stripes."""
    kind = rng.integers(4)
    if kind == 0:
        return rng.random((h, w)) < rng.random()
    if kind == 1:  # a few rectangles: long runs, large and negative deltas
        m = np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            y0, y1 = np.sort(rng.integers(0, h + 1, 2))
            x0, x1 = np.sort(rng.integers(0, w + 1, 2))
            m[y0:y1, x0:x1] ^= True
        return m
    if kind == 2:  # stripes along columns or rows
        period = int(rng.integers(1, 9))
        idx = np.arange(h)[:, None] if rng.integers(2) else np.arange(w)[None, :]
        return np.broadcast_to((idx // period) % 2 == 0, (h, w)).copy()
    # mixed: sparse noise on top of a blob
    m = rng.random((h, w)) < 0.02
    m[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = True
    return m


def _shapes() -> list[tuple[int, int]]:
    rng = np.random.default_rng(1234)
    fixed = [(1, 1), (1, 2), (2, 1), (1, 97), (97, 1), (3, 5), (5, 3), (7, 7), (31, 33), (64, 64)]
    drawn = [tuple(int(v) for v in rng.integers(1, 120, 2)) for _ in range(40)]
    return fixed + drawn


# --------------------------------------------------------------------------------------------
# round trips (no pycocotools needed)


@pytest.mark.parametrize("shape", _shapes())
def test_round_trip_random_shapes(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for _ in range(5):
        m = _random_mask(rng, *shape)
        enc = rle.encode(m)
        assert enc["size"] == list(shape)
        assert isinstance(enc["counts"], str)
        out = rle.decode(enc)
        assert out.dtype == np.bool_ and out.shape == shape
        np.testing.assert_array_equal(out, m)
        assert rle.area(enc) == int(m.sum())


@pytest.mark.parametrize("shape", [(1, 1), (1, 13), (13, 1), (4, 6), (17, 29), (1024, 1024)])
@pytest.mark.parametrize("fill", [False, True])
def test_empty_and_full(shape: tuple[int, int], fill: bool) -> None:
    m = np.full(shape, fill)
    enc = rle.encode(m)
    n = shape[0] * shape[1]
    # One run of zeros, or an empty zero run then one run of ones.
    assert rle._string_to_runs(enc["counts"]).tolist() == ([0, n] if fill else [n])
    np.testing.assert_array_equal(rle.decode(enc), m)
    assert rle.area(enc) == (n if fill else 0)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
def test_zero_size_masks(shape: tuple[int, int]) -> None:
    enc = rle.encode(np.zeros(shape, dtype=bool))
    assert enc == {"size": list(shape), "counts": "0"}  # pycocotools writes the run [0]
    assert rle.decode(enc).shape == shape
    assert rle.decode({"size": list(shape), "counts": ""}).shape == shape
    assert rle.area(enc) == 0


def test_known_strings() -> None:
    # Values checked by hand against the format (and against pycocotools in the tests below).
    assert rle.encode(np.array([[1]], dtype=bool))["counts"] == "01"
    assert rle.encode(np.array([[0]], dtype=bool))["counts"] == "1"
    assert rle.encode(np.array([[0, 1, 1, 0]], dtype=np.uint8))["counts"] == "121"
    # Column-major: [[1, 0], [1, 0]] is runs [0, 2, 2].
    assert rle.encode(np.array([[1, 0], [1, 0]], dtype=bool))["counts"] == "022"
    # 100 zeros: 100 = 0b11_00100 -> groups 4, 3 -> '4'+0x20='T', '3'.
    assert rle.encode(np.zeros((10, 10), dtype=bool))["counts"] == "T3"


def test_integer_masks_nonzero_is_foreground() -> None:
    rng = np.random.default_rng(5)
    m = rng.random((37, 23)) < 0.3
    expected = rle.encode(m)
    for dtype in (np.uint8, np.int32, np.int64, np.uint16):
        assert rle.encode(m.astype(dtype)) == expected
    assert rle.encode(m.astype(np.uint8) * 255) == expected


def test_memory_layouts() -> None:
    rng = np.random.default_rng(6)
    big = rng.random((80, 90)) < 0.5
    for view in (big, np.asfortranarray(big), big[::3, 1::2], big.T, big[::-1, ::-1]):
        enc = rle.encode(view)
        np.testing.assert_array_equal(rle.decode(enc), view)


def test_decode_accepts_bytes_and_uncompressed() -> None:
    rng = np.random.default_rng(7)
    m = rng.random((19, 41)) < 0.4
    enc = rle.encode(m)
    runs = rle._string_to_runs(enc["counts"])
    for counts in (
        enc["counts"].encode(),
        bytearray(enc["counts"].encode()),
        runs.tolist(),
        runs,
        runs.astype(np.uint32),
        tuple(runs.tolist()),
    ):
        other = {"size": [19, 41], "counts": counts}
        np.testing.assert_array_equal(rle.decode(other), m)
        assert rle.area(other) == int(m.sum())
    # Uncompressed RLE may contain empty runs in the middle.
    out = rle.decode({"size": [2, 3], "counts": [1, 0, 0, 2, 3]})
    # Column-major: 1 zero, 2 ones, 3 zeros.
    np.testing.assert_array_equal(out, [[False, True, False], [True, False, False]])


def test_string_codec_extreme_values() -> None:
    # Values near the uint32 limit and large negative deltas survive the string round trip.
    runs = np.array([0, 2**32 - 1, 1, 5, 2**31, 0, 2**32 - 1, 7, 1, 2**20], dtype=np.int64)
    s = rle._counts_to_string(runs)
    np.testing.assert_array_equal(rle._string_to_runs(s), runs)


def test_large_mask_is_fast() -> None:
    rng = np.random.default_rng(8)
    m = rng.random((1024, 1024)) < 0.5  # ~half a million runs, the worst case
    enc = rle.encode(m)
    out = rle.decode(enc)
    np.testing.assert_array_equal(out, m)
    assert rle.area(enc) == int(m.sum())
    # A per-pixel Python loop would take seconds. Generous bounds, on the best of three runs:
    # a busy machine slows some runs down, rarely all three.
    assert min(timeit.repeat(lambda: rle.encode(m), number=1, repeat=3)) < 1.5
    assert min(timeit.repeat(lambda: rle.decode(enc), number=1, repeat=3)) < 1.5


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("bad", [np.zeros(5, bool), np.zeros((2, 3, 1), bool), np.bool_(True)])
def test_encode_rejects_non_2d(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(bad)


def test_encode_rejects_float_masks() -> None:
    with pytest.raises(TypeError, match="dtype"):
        rle.encode(np.zeros((2, 2), dtype=np.float32))


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ("12 3", "outside"),  # space is below '0'
        ("12p", "outside"),  # 'p' is above 'o' (48 + 63)
        ("1\x7f", "outside"),
        ("1é", "non-ASCII"),
        ("1P", "truncated"),  # 'P' has the continuation bit
        ("P" * 13 + "0", "more than"),
    ],
)
def test_decode_rejects_malformed_strings(counts: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rle.decode({"size": [2, 2], "counts": counts})


def test_decode_rejects_wrong_totals() -> None:
    good = rle.encode(np.eye(4, dtype=bool))
    with pytest.raises(ValueError, match="sum to 16 but size"):
        rle.decode({"size": [4, 5], "counts": good["counts"]})
    with pytest.raises(ValueError, match="sum to 3 but size"):
        rle.decode({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError, match="sum to 5 but size"):
        rle.area({"size": [2, 2], "counts": [1, 2, 2]})
    with pytest.raises(ValueError, match="sum to 0 but size"):
        rle.decode({"size": [2, 2], "counts": ""})


def test_decode_rejects_negative_runs() -> None:
    with pytest.raises(ValueError, match="negative"):
        rle.decode({"size": [1, 4], "counts": [5, -1]})
    # Runs [1, 2, 5, 2 + (-4)]: a delta that drives run 3 below zero.
    s = rle._counts_to_string(np.array([1, 2, 5, -2]))
    with pytest.raises(ValueError, match="negative"):
        rle.decode({"size": [1, 6], "counts": s})


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1, 2], "mapping"),
        ({"counts": "1"}, "missing"),
        ({"size": [1, 1]}, "missing"),
        ({"size": [1], "counts": "1"}, "size"),
        ({"size": [1.0, 1], "counts": "1"}, "size"),
        ({"size": "ab", "counts": "1"}, "size"),
        ({"size": [True, 1], "counts": "1"}, "size"),
        ({"size": [-1, 1], "counts": "1"}, "non-negative"),
        ({"size": [1, 1], "counts": [[1]]}, "flat list"),
        ({"size": [1, 1], "counts": 1}, "flat list"),
        ({"size": [1, 1], "counts": [1.0]}, "integers"),
        ({"size": [1, 1], "counts": None}, "flat list"),
    ],
)
def test_decode_rejects_bad_objects(obj: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rle.decode(obj)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# exact compatibility with pycocotools


@pytest.fixture(scope="module")
def coco_mask():
    return pytest.importorskip("pycocotools.mask")


def _coco_encode(coco_mask, m: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))


# pycocotools' decode trips numpy 2's __array__ copy-keyword DeprecationWarning.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_matches_pycocotools_on_many_shapes(coco_mask) -> None:
    rng = np.random.default_rng(2024)
    shapes = _shapes() + [(0, 3), (3, 0), (200, 300), (301, 199)]
    checked = 0
    for shape in shapes:
        for _ in range(6):
            m = _random_mask(rng, *shape) if 0 not in shape else np.zeros(shape, bool)
            ours = rle.encode(m)
            theirs = _coco_encode(coco_mask, m)
            assert ours["size"] == list(theirs["size"])
            assert ours["counts"] == theirs["counts"].decode("ascii"), (shape, m)
            # And each side decodes the other's output.
            np.testing.assert_array_equal(rle.decode(theirs), m)
            np.testing.assert_array_equal(
                coco_mask.decode({"size": ours["size"], "counts": ours["counts"].encode()}), m
            )
            assert rle.area(theirs) == int(coco_mask.area(theirs))
            checked += 1
    assert checked == 6 * len(shapes)


@pytest.mark.parametrize("kind", ["noise", "blob", "empty", "full"])
def test_matches_pycocotools_1024(coco_mask, kind: str) -> None:
    rng = np.random.default_rng(99)
    if kind == "noise":
        m = rng.random((1024, 1024)) < 0.5
    elif kind == "blob":
        yy, xx = np.mgrid[:1024, :1024]
        m = (yy - 500) ** 2 + (xx - 430) ** 2 < 300**2
        m[700:900, 50:1000] = True
    else:
        m = np.full((1024, 1024), kind == "full")
    theirs = _coco_encode(coco_mask, m)
    ours = rle.encode(m)
    assert ours["counts"] == theirs["counts"].decode("ascii")
    np.testing.assert_array_equal(rle.decode(theirs), m)


def test_matches_pycocotools_uint8_values(coco_mask) -> None:
    # 0/1 and 0/255 masks: pycocotools and we agree.
    rng = np.random.default_rng(11)
    m = rng.random((45, 67)) < 0.5
    for arr in (m.astype(np.uint8), m.astype(np.uint8) * 255):
        theirs = coco_mask.encode(np.asfortranarray(arr))
        assert rle.encode(arr)["counts"] == theirs["counts"].decode("ascii")


def test_matches_pycocotools_uncompressed_and_huge_runs(coco_mask) -> None:
    # frPyObjects compresses an uncompressed RLE without building the mask, so long runs can
    # be compared without allocating the mask. pycocotools' rleToString allocates 6 bytes per
    # run (NUL included), so runs/deltas of 2**29 or more (7 characters), or strings of exactly
    # 6 characters per run, overflow its heap buffer: stay below both limits here (our own
    # codec has no such limit, see test_string_codec_extreme_values).
    h, w = 16384, 32767
    n = h * w
    assert n < 2**29
    rng = np.random.default_rng(3)
    compared = 0
    for _ in range(40):
        cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(1, 12))))
        runs = np.diff(np.concatenate(([0], cuts, [n]))).astype(np.int64)
        ours = rle._counts_to_string(runs)
        assert rle.area({"size": [h, w], "counts": ours}) == int(runs[1::2].sum())
        assert rle.area({"size": [h, w], "counts": runs.tolist()}) == int(runs[1::2].sum())
        if len(ours) >= 6 * runs.size:
            continue
        theirs = coco_mask.frPyObjects({"size": [h, w], "counts": runs.tolist()}, h, w)
        assert ours == theirs["counts"].decode("ascii")
        assert rle.area(theirs) == int(runs[1::2].sum())
        compared += 1
    assert compared >= 20
    small = rng.random((13, 8)) < 0.5
    runs = rle._mask_to_runs(small).tolist()
    theirs = coco_mask.frPyObjects({"size": [13, 8], "counts": runs}, 13, 8)
    np.testing.assert_array_equal(rle.decode(theirs), small)
    np.testing.assert_array_equal(rle.decode({"size": [13, 8], "counts": runs}), small)
