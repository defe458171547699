"""The cpp backend's parallel paths for fewer (sequence, head) units than threads.

Column split (forward): each unit's state columns are cut into groups scanned as separate tasks; it must equal the
serial scan bit for bit (the same operations in the same order), in both of its schedules (free-running when the
inputs are read as they are, lockstep chunks when rows are converted first), with packed sequences shorter and
longer than a lockstep chunk. Segment split: each sequence is cut into segments whose states come from a prefix
over per-segment sums (forward) and a suffix (backward); it must give the serial scan's results up to rounding:
outputs, final states and every gradient against the float64 reference, with segment boundaries inside and on the
kernel's 64-token blocks, across packed-sequence boundaries, with states in and out. FASTML_LA_SEGMENT (tokens per
segment) and FASTML_LA_COLUMNS (column groups) force the splits whatever the unit and thread counts."""
import pytest
import torch

import fastml
from fastml.testing import assert_close
from support import BF16, F16, F32, F64, Target, check_la_backend, la_inputs, la_run

pytestmark = pytest.mark.skipif(not fastml.backends()["cpp"][0], reason="the cpp backend is not built")

CPP = Target("cpp", "cpu")


@pytest.fixture
def segment(monkeypatch):
    """Sets FASTML_LA_SEGMENT for one test (read by the kernels at every call)."""

    def set_(n):
        monkeypatch.setenv("FASTML_LA_SEGMENT", str(n))

    return set_


@pytest.fixture
def columns(monkeypatch):
    """Sets FASTML_LA_COLUMNS for one test (read by the kernels at every call)."""

    def set_(n):
        monkeypatch.setenv("FASTML_LA_COLUMNS", str(n))

    return set_


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# (segment length, B, H, T, K, V, dtype, feature_map, normalize, scale, with_state): segments of one token, ending
# inside a 64-token block (50, 100), on block boundaries (64, 128), a last segment shorter than the others, and
# head dims that are not whole vector tiles.
CASES = [
    (1, 1, 2, 9, 16, 16, F64, "elu+1", True, 0.7, True),
    (50, 1, 2, 257, 60, 64, F32, "elu+1", True, 1.0, True),
    (64, 2, 1, 257, 64, 60, F64, None, False, 0.5, True),
    (100, 1, 3, 300, 16, 128, F32, "relu", False, 0.125, False),
    (128, 1, 2, 300, 128, 16, F64, "relu", True, 0.7, True),
    (64, 1, 2, 200, 64, 64, BF16, "elu+1", True, 0.7, True),
    (50, 1, 2, 200, 60, 16, F16, None, False, 1.0, False),
    (77, 2, 2, 250, 32, 32, F32, "elu+1", False, 1.0, True),
]


@pytest.mark.parametrize("seg,B,H,T,K,V,dtype,feature_map,normalize,scale,with_state", CASES)
def test_segments_match_reference(segment, seg, B, H, T, K, V, dtype, feature_map, normalize, scale, with_state):
    segment(seg)
    q, k, v, state = la_inputs(B, H, T, K, V, dtype, with_state=with_state, seed=seg + T,
                               nonnegative=feature_map is None and normalize)
    check_la_backend(CPP, q, k, v, state, feature_map=feature_map, normalize=normalize, scale=scale)


# Packed sequences with empty ones, one token, and lengths shorter and longer than a segment, so that segment cuts
# fall inside sequences, at their starts, and some sequences are not cut at all.
CU = (0, 0, 5, 70, 70, 200, 201, 333)


@pytest.mark.parametrize("seg", [1, 30, 64, 100])
@pytest.mark.parametrize("dtype,feature_map,normalize,with_state",
                         [(F64, "elu+1", True, True), (F32, None, False, True), (F32, "relu", True, False)])
def test_segments_with_cu_seqlens(segment, seg, dtype, feature_map, normalize, with_state):
    segment(seg)
    cu = torch.tensor(CU)
    q, k, v, state = la_inputs(1, 2, CU[-1], 60, 24, dtype, with_state=with_state, n_seq=len(CU) - 1, seed=seg,
                               nonnegative=feature_map is None and normalize)
    check_la_backend(CPP, q, k, v, state, feature_map=feature_map, normalize=normalize, cu_seqlens=cu)


def _serial_and_split(segment, split, q, k, v, state, **opts):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTML_LA_COLUMNS", "1")
        segment(q.shape[2])  # one segment per sequence, no column groups: the serial scan
        serial = la_run("cpp", q, k, v, state, **opts)
    split()
    return serial, la_run("cpp", q, k, v, state, **opts)


@pytest.mark.parametrize("feature_map,normalize", [(None, False), ("elu+1", True)])
def test_split_equals_serial_up_to_rounding(segment, feature_map, normalize):
    """float32: the split path computes (its sums are added in another order, so the bits differ) and agrees with
    the serial scan to float32 rounding."""
    q, k, v, state = la_inputs(1, 2, 640, 64, 64, F32, with_state=True, seed=3)
    serial, split = _serial_and_split(segment, lambda: segment(200), q, k, v, state, feature_map=feature_map,
                                      normalize=normalize)
    assert any(not torch.equal(a, b) for a, b in zip(serial, split)), "the split path was not taken"
    for name, a, b in zip(("o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"), split, serial):
        scale = b.abs().amax().clamp_min(1e-30)
        assert_close(a / scale, b / scale, dtype=F32, name=name)


def test_split_chosen_when_units_are_fewer_than_threads(segment, monkeypatch, threads):
    """Without FASTML_LA_SEGMENT, one sequence and one head on two threads are cut: the backward into segments
    (their gradients' rounding differs from the serial scan's), the forward into column groups (bit for bit the
    serial scan); as many units as threads are not cut at all (bit for bit the serial scan)."""
    threads(2)
    q, k, v, state = la_inputs(1, 1, 4096, 32, 32, F32, with_state=True, seed=5)
    serial, auto = _serial_and_split(segment, lambda: monkeypatch.delenv("FASTML_LA_SEGMENT"), q, k, v, state,
                                     feature_map="elu+1", normalize=True)
    assert any(not torch.equal(a, b) for a, b in zip(serial[3:], auto[3:])), "the backward was not split"
    for name, a, b in zip(("o", "kv", "z"), auto, serial):
        assert torch.equal(a, b), f"{name}: the column split must give the serial scan's bits"
    for name, a, b in zip(("o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"), auto, serial):
        scale = b.abs().amax().clamp_min(1e-30)
        assert_close(a / scale, b / scale, dtype=F32, name=name)
    q2, k2, v2, state2 = la_inputs(1, 2, 4096, 32, 32, F32, with_state=True, seed=5)
    serial, auto = _serial_and_split(segment, lambda: monkeypatch.delenv("FASTML_LA_SEGMENT"), q2, k2, v2, state2,
                                     feature_map="elu+1", normalize=True)
    for name, a, b in zip(("o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"), auto, serial):
        assert torch.equal(a, b), f"{name}: two units on two threads should run the serial scan"


# The automatic split (FASTML_LA_SEGMENT unset) on more threads than units: a unit cut in two, whose backward runs
# the two-phase schedule (each half starts the sweep it can, the other half's state follows), and, with three
# threads for one unit, three segments per unit and the general prefix/suffix backward.
AUTO_CASES = [
    # (threads, B, H, T, cu_seqlens, dtype, feature_map, normalize, with_state)
    (2, 1, 1, 3000, None, F64, "elu+1", True, True),
    (2, 1, 1, 2500, None, F32, None, False, False),
    (2, 1, 1, 2600, (0, 2600), F64, "relu", False, True),
    (4, 1, 2, 2200, None, F64, None, False, True),
    (4, 1, 1, 2300, (0, 5, 2300), F64, "elu+1", True, True),
    (3, 1, 1, 3300, None, F64, "elu+1", False, True),
]


@pytest.mark.parametrize("cols", ["", "1"])
@pytest.mark.parametrize("n_threads,B,H,T,cu,dtype,feature_map,normalize,with_state", AUTO_CASES)
def test_automatic_split_matches_reference(monkeypatch, threads, n_threads, B, H, T, cu, dtype, feature_map,
                                           normalize, with_state, cols):
    """cols "": the automatic choice (column groups in the forward); "1": no column groups, so that the forward
    is cut into segments as the backward is."""
    monkeypatch.delenv("FASTML_LA_SEGMENT", raising=False)
    monkeypatch.setenv("FASTML_LA_COLUMNS", cols)
    threads(n_threads)
    n_seq = B if cu is None else len(cu) - 1
    q, k, v, state = la_inputs(B, H, T, 32, 48, dtype, with_state=with_state, n_seq=n_seq, seed=T,
                               nonnegative=feature_map is None and normalize)
    opts = {} if cu is None else {"cu_seqlens": torch.tensor(cu)}
    check_la_backend(CPP, q, k, v, state, feature_map=feature_map, normalize=normalize, **opts)


def test_bad_segment_setting_raises(segment):
    segment("ten")
    q, k, v, _ = la_inputs(1, 1, 8, 4, 4, F32)
    with pytest.raises(ValueError, match="FASTML_LA_SEGMENT"):
        fastml.causal_linear_attention(q, k, v, backend="cpp")


# ---- the column split ----

# (groups, B, H, T, K, V, dtype, feature_map, normalize, scale, with_state): the free-running schedule (float32 or
# float64, no feature map, scale 1, head dims of whole vectors) and the lockstep one (anything converted: a feature
# map, a scale, half precision, padded head dims); one to four groups, more groups than the head dims allow (capped),
# sequences shorter and longer than a lockstep chunk (512 tokens).
COLUMN_CASES = [
    (2, 1, 1, 1300, 64, 64, F32, None, False, 1.0, True),
    (4, 1, 2, 700, 32, 64, F64, None, True, 1.0, True),
    (2, 1, 1, 1300, 64, 64, F32, "elu+1", True, 1.0, True),
    (3, 2, 1, 600, 48, 96, F64, "relu", False, 0.5, False),
    (2, 1, 1, 1100, 60, 50, F32, None, True, 1.0, True),
    (16, 1, 1, 520, 64, 128, F64, "elu+1", False, 1.0, True),
    (2, 1, 2, 700, 64, 64, BF16, "elu+1", True, 1.0, True),
    (2, 1, 1, 300, 32, 32, F16, None, False, 1.0, False),
]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("groups,B,H,T,K,V,dtype,feature_map,normalize,scale,with_state", COLUMN_CASES)
def test_columns_match_reference(columns, threads, n_threads, groups, B, H, T, K, V, dtype, feature_map, normalize,
                                 scale, with_state):
    columns(groups)
    threads(n_threads)
    q, k, v, state = la_inputs(B, H, T, K, V, dtype, with_state=with_state, seed=groups + T,
                               nonnegative=feature_map is None and normalize)
    check_la_backend(CPP, q, k, v, state, feature_map=feature_map, normalize=normalize, scale=scale)


@pytest.mark.parametrize("feature_map,normalize", [(None, False), (None, True), ("elu+1", True), ("relu", False)])
def test_columns_equal_serial_bit_for_bit(segment, columns, threads, feature_map, normalize):
    """The forward's column groups compute every output element with the serial scan's operations in its order."""
    threads(2)
    q, k, v, state = la_inputs(1, 1, 1500, 64, 64, F32, with_state=True, seed=11, nonnegative=normalize)
    serial, split = _serial_and_split(segment, lambda: columns(4), q, k, v, state, feature_map=feature_map,
                                      normalize=normalize)
    for name, a, b in zip(("o", "kv", "z"), split, serial):
        assert torch.equal(a, b), f"{name} differs from the serial scan"


# Packed sequences for the lockstep chunks: empty ones, one token, lengths below, at and above a chunk (512).
CU_LONG = (0, 0, 1, 513, 513, 1025, 1600)


@pytest.mark.parametrize("feature_map,normalize,dtype", [(None, True, F64), ("elu+1", True, F32),
                                                         ("relu", False, F64)])
def test_columns_with_cu_seqlens(columns, threads, feature_map, normalize, dtype):
    columns(2)
    threads(2)
    cu = torch.tensor(CU_LONG)
    q, k, v, state = la_inputs(1, 2, CU_LONG[-1], 32, 32, dtype, with_state=True, n_seq=len(CU_LONG) - 1, seed=4,
                               nonnegative=feature_map is None and normalize)
    check_la_backend(CPP, q, k, v, state, feature_map=feature_map, normalize=normalize, cu_seqlens=cu)


@pytest.mark.parametrize("seg", [100, 512])
def test_columns_and_segments_together(segment, columns, seg):
    """Segments whose scans are cut into column groups (the split for more threads than units x groups)."""
    segment(seg)
    columns(2)
    q, k, v, state = la_inputs(1, 2, 1200, 32, 48, F64, with_state=True, seed=seg)
    check_la_backend(CPP, q, k, v, state, feature_map="elu+1", normalize=True)


def test_bad_column_setting_raises(columns):
    columns("-2")
    q, k, v, _ = la_inputs(1, 1, 8, 4, 4, F32)
    with pytest.raises(ValueError, match="FASTML_LA_COLUMNS"):
        fastml.causal_linear_attention(q, k, v, backend="cpp")
