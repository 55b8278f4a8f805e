"""Posteriors, top-k error, Parquet I/O and averaging (fusion) in vgg.results.metrics."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from vgg.results import metrics
from vgg.results.metrics import (FusionError, Posteriors, average, errors, read_posteriors, softmax,
                            topk_error, write_posteriors)

# Hand-made case, K = 6. Rank of the true class (1 = highest) per row: 1, 2, 6, 2.
HAND_PROBS = np.array([
    [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # label 0: rank 1
    [0.10, 0.40, 0.20, 0.15, 0.10, 0.05],  # label 2: rank 2 (0.40 above it)
    [0.30, 0.25, 0.20, 0.10, 0.10, 0.05],  # label 5: rank 6 (last)
    [0.05, 0.05, 0.10, 0.10, 0.20, 0.50],  # label 4: rank 2 (0.50 above it)
], dtype=np.float32)
HAND_LABELS = np.array([0, 2, 5, 4])
CLASSES6 = ["ant", "bee", "cat", "dog", "eel", "fox"]


def make_post(n=8, k=6, seed=0, keys=None, classes=None) -> Posteriors:
    rng = np.random.default_rng(seed)
    keys = keys or [f"img{i:03d}" for i in range(n)]
    classes = classes or [f"c{j}" for j in range(k)]
    return Posteriors(keys, rng.integers(0, k, n), softmax(rng.normal(size=(n, k))), classes)


# ------------------------------------------------------------------ top-k
def test_topk_error_hand_made_case():
    # top-1: only row 0 right -> 3/4; top-2 and top-5: only row 2 wrong -> 1/4; top-6: 0
    assert topk_error(HAND_PROBS, HAND_LABELS, 1) == 0.75
    assert topk_error(HAND_PROBS, HAND_LABELS, 2) == 0.25
    assert topk_error(HAND_PROBS, HAND_LABELS, 5) == 0.25
    assert topk_error(HAND_PROBS, HAND_LABELS, 6) == 0.0
    post = Posteriors(["a", "b", "c", "d"], HAND_LABELS, HAND_PROBS, CLASSES6)
    assert errors(post) == {"top1": 0.75, "top5": 0.25}


def test_ties_count_against_the_true_class():
    flat = np.full((4, 4), 0.25, dtype=np.float32)
    labels = np.arange(4)  # whatever the position of the true class
    for k in (1, 2, 3):
        assert topk_error(flat, labels, k) == 1.0
    assert topk_error(flat, labels, 4) == 0.0
    # true class 1 (0.3) ties with class 2 (0.3), below class 0 (0.4): top-2 is still an error
    row = np.array([[0.4, 0.3, 0.3, 0.0]], dtype=np.float32)
    assert topk_error(row, [1], 2) == 1.0 and topk_error(row, [2], 2) == 1.0
    assert topk_error(row, [1], 3) == 0.0
    assert topk_error(row, [0], 1) == 0.0  # a strict maximum is right


def test_topk_error_blocks_agree_with_one_block(monkeypatch):
    post = make_post(n=50, k=10, seed=3)
    whole = [topk_error(post.probs, post.labels, k) for k in (1, 5)]
    monkeypatch.setattr(metrics, "_CHUNK", 7)
    assert [topk_error(post.probs, post.labels, k) for k in (1, 5)] == whole


def test_topk_error_rejects_bad_k_and_empty():
    with pytest.raises(ValueError, match="k = 7"):
        topk_error(HAND_PROBS, HAND_LABELS, 7)
    with pytest.raises(ValueError, match="k = 0"):
        topk_error(HAND_PROBS, HAND_LABELS, 0)
    with pytest.raises(ValueError, match="no images"):
        topk_error(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), 1)


def test_errors_leave_out_topk_that_cannot_miss():
    # with K <= 5 classes every net has top-5 error 0: not applicable, not 0.0
    assert set(errors(make_post(k=3))) == {"top1"}
    assert set(errors(make_post(k=5))) == {"top1"}
    assert set(errors(make_post(k=6))) == {"top1", "top5"}


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]]))
    assert p.dtype == np.float32 and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(p[0], [1, 0, 0])
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p[1], e / e.sum(), rtol=1e-6)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("change, message", [
    (dict(labels=np.array([0, 1, 2])), "labels must have shape"),
    (dict(labels=np.array([0, 1, 2, 6])), "outside \\[0, 6\\)"),
    (dict(keys=["a", "b", "a", "c"]), "keys must be unique.*'a'"),
    (dict(keys=["a", "b", "c"]), "3 keys for 4 rows"),
    (dict(classes=CLASSES6[:5]), "5 class names for 6 columns"),
    (dict(probs=HAND_PROBS * [[1], [1.01], [1], [1]]), "1 rows of probs do not sum to 1.*key 'b' sums to 1.01"),
    (dict(probs=HAND_PROBS[:, ::-1] - 0.1), "negative or non-finite"),
    (dict(probs=HAND_PROBS[0]), "must be 2-D"),
])
def test_posteriors_validation(change, message):
    args = dict(keys=["a", "b", "c", "d"], labels=HAND_LABELS, probs=HAND_PROBS, classes=CLASSES6)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        Posteriors(**args)


def test_posteriors_normalises_types():
    post = Posteriors(("a", "b"), [1, 0], [[0.25, 0.75], [1.0, 0.0]], ("x", "y"))
    assert post.labels.dtype == np.int64 and post.probs.dtype == np.float32
    assert post.keys == ["a", "b"] and post.classes == ["x", "y"]


# ------------------------------------------------------------------ Parquet
def test_parquet_round_trip_is_exact(tmp_path):
    post = make_post(n=20, k=7)
    fs = pafs.LocalFileSystem()
    path = str(tmp_path / "deep" / "dir" / "posteriors.parquet")
    write_posteriors(post, fs, path)
    back = read_posteriors(fs, path)
    assert back.keys == post.keys and back.classes == post.classes
    assert np.array_equal(back.labels, post.labels) and np.array_equal(back.probs, post.probs)
    schema = pq.read_schema(path)
    assert schema.field("probs").type == pa.list_(pa.float32(), 7)
    assert schema.field("label").type == pa.int32()


def test_parquet_on_another_filesystem(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    post = make_post(n=5, k=3)
    write_posteriors(post, fs, "out/p.parquet")
    write_posteriors(post, fs, "top.parquet")  # no parent folder to create
    assert (tmp_path / "out" / "p.parquet").exists()
    assert np.array_equal(read_posteriors(fs, "out/p.parquet").probs, post.probs)


def test_read_accepts_variable_lists_and_checks_them(tmp_path):
    post = make_post(n=4, k=3)
    probs = pa.array([list(map(float, r)) for r in post.probs], type=pa.list_(pa.float32()))
    meta = {b"classes": b'["c0", "c1", "c2"]'}
    table = pa.table({"key": post.keys, "label": post.labels.astype(np.int32), "probs": probs})
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "ok.parquet")
    fs = pafs.LocalFileSystem()
    assert np.array_equal(read_posteriors(fs, str(tmp_path / "ok.parquet")).probs, post.probs)
    short = pa.array([[0.5, 0.5]] * 4, type=pa.list_(pa.float32()))
    pq.write_table(table.set_column(2, "probs", short).replace_schema_metadata(meta), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row 0 has 2 probs for 3 classes"):
        read_posteriors(fs, str(tmp_path / "bad.parquet"))
    pq.write_table(table, tmp_path / "nometa.parquet")
    with pytest.raises(ValueError, match="classes"):
        read_posteriors(fs, str(tmp_path / "nometa.parquet"))


# ------------------------------------------------------------------ averaging
def test_average_of_one_member_reproduces_it():
    post = make_post()
    out = average([post])
    assert out.keys == post.keys and np.array_equal(out.probs, post.probs)
    assert np.array_equal(out.labels, post.labels)


def test_average_of_identical_members_is_unchanged():
    post = make_post()
    assert np.array_equal(average([post, post, post]).probs, post.probs)


def test_average_weights():
    a, b = make_post(seed=1), make_post(seed=2)
    b = Posteriors(b.keys, a.labels, b.probs, b.classes)
    out = average([a, b], weights=[3, 1])
    np.testing.assert_allclose(out.probs, (3 * a.probs + b.probs) / 4, rtol=1e-6)
    np.testing.assert_allclose(average([a, b]).probs, (a.probs + b.probs) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        average([a, b], weights=[1, -1])
    with pytest.raises(ValueError, match="weights"):
        average([a, b], weights=[1])


def test_average_aligns_reordered_keys():
    a = make_post(seed=1)
    b = a.select(a.keys[::-1])
    assert b.keys != a.keys
    out = average([a, b], names=["D", "E"])
    assert out.keys == a.keys and np.array_equal(out.probs, a.probs)


def test_missing_and_extra_keys_name_the_member():
    a = make_post(n=8)
    b = Posteriors(a.keys[2:] + ["new"], a.labels[:7], a.probs[:7], a.classes)  # img000, img001 gone
    with pytest.raises(FusionError) as err:
        average([a, a, b], names=["D", "E", "C"])
    msg = str(err.value)
    assert "member 'C'" in msg and "'E'" not in msg
    assert "2 of the 8 keys of 'D' are missing" in msg and "'img000'" in msg
    assert "1 keys not in 'D'" in msg and "'new'" in msg
    assert isinstance(err.value, ValueError) and len(err.value.problems) >= 2


def test_differing_labels_name_the_key_and_both_labels():
    a = make_post(n=6, k=4)
    labels = a.labels.copy()
    labels[3] = (labels[3] + 1) % 4
    b = Posteriors(a.keys, labels, a.probs, a.classes).select(a.keys[::-1])  # also reordered
    with pytest.raises(FusionError, match="member 'E'") as err:
        average([a, b], names=["D", "E"])
    assert (f"labels differ from 'D' for 1 keys (key 'img003': {a.labels[3]} in 'D', "
            f"{labels[3]} in 'E')") in str(err.value)


@pytest.mark.parametrize("classes, expected", [
    (["c0", "c1", "c2", "zz"], "different classes, first difference at index 3: 'c3' in 'D', 'zz' in 'E'"),
    (["c1", "c0", "c2", "c3"], "same classes in a different order, first difference at index 0"),
])
def test_differing_class_lists(classes, expected):
    a = make_post(n=5, k=4)
    b = Posteriors(a.keys, a.labels, a.probs, classes)
    with pytest.raises(FusionError) as err:
        average([a, b], names=["D", "E"])
    assert "member 'E': class list differs from 'D'" in str(err.value) and expected in str(err.value)


def test_differing_class_counts():
    a, b = make_post(n=5, k=4), make_post(n=5, k=5)
    b = Posteriors(b.keys, a.labels, b.probs, b.classes)
    with pytest.raises(FusionError, match="5 classes vs 4.*1 only in 'E' \\(e.g. 'c4'\\)"):
        average([a, b], names=["D", "E"])


def test_average_argument_errors():
    with pytest.raises(ValueError, match="at least one"):
        average([])
    post = make_post()
    with pytest.raises(ValueError, match="unique names"):
        average([post, post], names=["D", "D"])
