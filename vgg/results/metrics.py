"""Softmax posteriors of one evaluation, their top-k error, and their fusion.

Pure library code (no MLflow, no Ray); the `evaluate` and `fuse` stages use it.

Every evaluation in the paper ends in softmax posteriors that are *averaged*
(Sec. 3.2): over an image and its flip, over crops, over test scales Q, over
dense and multi-crop, and over nets (fusion, Sec. 4.4). `Posteriors` holds one
such result per image; `average` is the single averaging operation behind all
of them; `topk_error` scores it (Sec. 4: top-1 and top-5 error).

File formats (`write_posteriors` / `read_posteriors`, by the file's extension). Parquet
(`vgg.results.parquet`, what the pipeline's stages write): one file, one row per image,
columns

    key     string                       image key (unique)
    label   int32                        true class index
    probs   fixed_size_list<float32>[K]  softmax posteriors, in class order

and the class names (label order) as JSON in the schema metadata under
b"classes". Reading also accepts `probs` as list<float32> / large_list<float32>
with exactly K values per row. Read and write go through Arrow buffers, without
per-row Python loops (ImageNet val: N = 50,000, K = 1000 is ~200 MB of float32).
NumPy `.npz` (what a run of the library alone writes where pyarrow is not installed):
arrays keys, labels, probs, classes and format, the same values.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vgg.errors import DamagedFile
from vgg.paper import within_topk
from vgg.storage import read_bytes, write_bytes

ROW_SUM_TOL = 1e-3  # rows of `probs` must sum to 1 within this
FORMAT = "vgg-posteriors/1"  # the files' format tag (Parquet: schema metadata b"format")
_N_EXAMPLES = 3  # examples named in an error message
_CHUNK = 4096  # rows per block in topk_error (bounds the (rows, K) temporaries)


class FusionError(ValueError):
    """Posteriors that cannot be averaged: different images, labels or classes."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("cannot average posteriors:\n" + "\n".join(f"  - {p}" for p in problems))


def _examples(items: Sequence) -> str:
    shown = ", ".join(repr(x) for x in items[:_N_EXAMPLES])
    return f"e.g. {shown}" + (", ..." if len(items) > _N_EXAMPLES else "")


# ------------------------------------------------------------------ container
@dataclass(frozen=True, eq=False)
class Posteriors:
    """Softmax posteriors of N images over K classes.

    keys: N unique image keys (list of str); labels: (N,) int64 true classes;
    probs: (N, K) float32, rows sum to 1; classes: K class names in label order.
    Inputs are converted to these types; arrays may be read-only views (e.g.
    after `read_posteriors`): treat a Posteriors as immutable.
    """

    keys: list[str]
    labels: np.ndarray
    probs: np.ndarray
    classes: list[str]

    def __post_init__(self):
        keys, classes = list(self.keys), list(self.classes)
        labels = np.asarray(self.labels)
        probs = np.asarray(self.probs)
        if probs.ndim != 2:
            raise ValueError(f"probs must be 2-D (N, K), got shape {probs.shape}")
        n, k = probs.shape
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape ({n},) to match probs {probs.shape}, got {labels.shape}")
        if len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} rows of probs")
        if len(classes) != k:
            raise ValueError(f"{len(classes)} class names for {k} columns of probs")
        if k < 1:
            raise ValueError("probs has no classes (K = 0)")
        _check_strings(keys, "keys")
        _check_strings(classes, "classes")
        if n and not (np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        bad = np.flatnonzero((labels < 0) | (labels >= k))
        if bad.size:
            i = bad[0]
            raise ValueError(f"{bad.size} labels outside [0, {k}): key {keys[i]!r} has label {labels[i]}")
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        _check_rows(probs, keys)
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "probs", probs)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]

    def select(self, keys: Sequence[str]) -> Posteriors:
        """The rows of `keys`, in that order (KeyError for an unknown key)."""
        pos = {k: i for i, k in enumerate(self.keys)}
        idx = np.fromiter((pos[k] for k in keys), dtype=np.int64, count=len(keys))
        return Posteriors(list(keys), self.labels[idx], self.probs[idx], self.classes)


def _check_strings(items: list, what: str) -> None:
    wrong = [x for x in items if not isinstance(x, str)]
    if wrong:
        raise ValueError(f"{what} must be strings, got {type(wrong[0]).__name__} {wrong[0]!r}")
    if len(set(items)) != len(items):
        seen, dups = set(), []
        for x in items:
            if x in seen and x not in dups:
                dups.append(x)
            seen.add(x)
        raise ValueError(f"{what} must be unique: {len(dups)} repeated ({_examples(dups)})")


def _check_rows(probs: np.ndarray, keys: list[str]) -> None:
    """Every row finite, non-negative, summing to 1 within ROW_SUM_TOL."""
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1))
    if bad.size:
        raise ValueError(f"{bad.size} rows of probs have negative or non-finite values "
                         f"(first: key {keys[bad[0]]!r}); pass softmax posteriors, not logits")
    sums = probs.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOL)
    if bad.size:
        i = bad[0]
        raise ValueError(f"{bad.size} rows of probs do not sum to 1 (+-{ROW_SUM_TOL}): "
                         f"key {keys[i]!r} sums to {sums[i]:.6f}; pass softmax posteriors, not logits")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along `axis` (max subtracted; computed in float64), as float32."""
    x = np.array(logits, dtype=np.float64)  # a copy, then in place: no more (N, K) temporaries
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x.astype(np.float32)


# ------------------------------------------------------------------ file I/O
def write_posteriors(post: Posteriors, fs, path: str) -> None:
    """Write `post` as one file at `path` on `fs` (a `vgg.storage` filesystem): Parquet for
    a `.parquet` path (needs pyarrow; format: module docstring), NumPy's `.npz` otherwise."""
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if path.endswith(".parquet"):
        from vgg.results import parquet  # pyarrow, only for Parquet files

        parquet.write_posteriors(fs, path, post.keys, post.labels, post.probs, post.classes)
        return
    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(post.keys, dtype=str), labels=post.labels.astype(np.int32),
             probs=post.probs, classes=np.asarray(post.classes, dtype=str), format=np.asarray(FORMAT))
    write_bytes(fs, path, buf.getvalue())


def read_posteriors(fs, path: str) -> Posteriors:
    """Read a file written by `write_posteriors` (validated like any Posteriors); a file that
    cannot be read (truncated, corrupt) raises `vgg.errors.DamagedFile` naming it."""
    try:
        return _read_posteriors(fs, path)
    except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid and numpy's errors too
        if isinstance(e, FileNotFoundError):
            raise
        raise DamagedFile(f"cannot read the posteriors file {path}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _read_posteriors(fs, path: str) -> Posteriors:
    if path.endswith(".parquet"):
        from vgg.results import parquet  # pyarrow, only for Parquet files

        return Posteriors(*parquet.read_posteriors(fs, path))
    with np.load(io.BytesIO(read_bytes(fs, path)), allow_pickle=False) as z:
        missing = {"keys", "labels", "probs", "classes"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: not a posteriors file, missing arrays {sorted(missing)}")
        return Posteriors(z["keys"].tolist(), z["labels"].astype(np.int64), z["probs"], z["classes"].tolist())


# ------------------------------------------------------------------ errors
def topk_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: whether each image's true class is among its k highest scores.

    Ties never help: the true class counts as within the top k only if fewer
    than k *other* classes score >= it (i.e. ties are broken against the true
    class). So a constant row is a miss for every k < K. A row with a non-finite
    score is a miss (NaN compares false with everything, and would otherwise
    have "-1 rivals").
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"need probs (N, K) and labels (N,), got {probs.shape} and {labels.shape}")
    n, num_classes = probs.shape
    if not 1 <= k <= num_classes:
        raise ValueError(f"k = {k} is outside [1, K = {num_classes}]")
    hits = np.zeros(n, dtype=bool)
    for s in range(0, n, _CHUNK):  # blocks bound the (rows, K) boolean temporaries
        hits[s:s + _CHUNK] = within_topk(probs[s:s + _CHUNK], labels[s:s + _CHUNK], k)
    return hits


def topk_error(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of images whose true class is not among the k highest scores (`topk_hits`)."""
    hits = topk_hits(probs, labels, k)
    if hits.size == 0:
        raise ValueError("no images: the error of an empty set is undefined")
    return 1.0 - hits.sum() / hits.size


def meaningful_topk(ks: Sequence[int], num_classes: int) -> list[int]:
    """The k of `ks` whose top-k error says something with `num_classes` classes: k < K
    (with K <= 5 classes the top-5 error is 0 for any net, so it is not reported)."""
    return [k for k in ks if k < num_classes]


def errors(post: Posteriors, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...} as fractions; a k >= K is left out (see `meaningful_topk`)."""
    return {f"top{k}": topk_error(post.probs, post.labels, k)
            for k in meaningful_topk(ks, post.num_classes)}


# ------------------------------------------------------------------ collapse
# A net has collapsed when it learnt nothing, or nothing about some of its classes. Each
# test below asks whether the predictions beat what a net that had learnt nothing would
# score *by chance*, with an exact binomial margin (so a small class or a small validation
# set needs clearer evidence), and never whether a class is predicted about as often as
# the others: a healthy net can under-predict a hard, confusable class and still have
# learnt it (issue 32: nets at 22-26% error predicted one class at 7-20% of its fair
# share, mostly correctly; the old "fewer than 25% of its fair share" rule called all
# of them collapsed).

#: One-sided significance of "the top-1 error is clearly below chance": the probability
#: that a net that learnt nothing passes by luck (about a three-sigma margin). With 200
#: images of 5 balanced classes (the demo) it takes 59 hits or more (70.5% error or less).
CHANCE_ALPHA = 0.001
#: The same for one class ("its images are recognised more often than chance"), more
#: lenient because a miss here calls a healthy net collapsed, while a class a collapsed
#: net has given up is never or almost never predicted and fails at any level: at 10
#: classes a class predicted 4 times needs 3 hits, 7 times 4, 14 times 5.
CLASS_ALPHA = 0.01
#: A net is collapsed when its posteriors hardly vary across images: the mean over classes
#: of the standard deviation of p(class) across images, times K, is below this (a net that
#: separates the classes well is near sqrt(K - 1); a constant output is 0).
MIN_POSTERIOR_SPREAD = 0.1
#: ... or when more than this share of the classes present in the validation set (and at
#: least one) is not learnt: its images are recognised no more often than chance would
#: give, given how often the net predicts that class (`unlearnt_classes`). With K < 100
#: any such class is a collapse (issue 26's D never predicted 1 of 5 classes); at
#: ImageNet's 1000 classes up to 10 are tolerated: with 50 images a class, a hard class
#: at 5% recall shows no hit 8% of the time, and ImageNet has near-duplicate classes
#: (e.g. "maillot" / "maillot, tank suit") one of which a healthy net may absorb.
MAX_UNLEARNT_SHARE = 0.01


def _above_chance(hits, trials, p, alpha: float) -> np.ndarray:
    """Whether `hits` successes in `trials` are clearly more than chance at rate `p`:
    the binomial tail P(X >= hits) is below `alpha` (0 hits never are)."""
    from scipy.special import bdtrc  # P(X > k) of Binomial(n, p)

    hits, trials, p = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (hits, trials, p)))
    tail = np.ones(hits.shape)
    ok = hits > 0
    k, n = (np.rint(a[ok]).astype(np.int64) for a in (hits, trials))  # sums of counts
    tail[ok] = bdtrc(k - 1, n, np.clip(p[ok], 0.0, 1.0))
    return ok & (tail < alpha)


@dataclass(frozen=True)
class Health:
    """Whether a net's validation predictions show a collapse (it did not learn)."""

    collapsed: bool
    classes_predicted: int  # classes that are the top-1 prediction of at least one image
    num_classes: int
    top_class_share: float  # share of the images predicted as the most predicted class
    posterior_spread: float  # see MIN_POSTERIOR_SPREAD
    reason: str = ""
    #: images predicted as the least predicted class / (n / K) (informative only; None in
    #: health files written before it)
    rarest_class_share: float | None = None
    #: top-1 error, and the error of the best blind guess (always the most frequent class:
    #: 1 - 1/K on a balanced set); None in health files written before these
    top1_error: float | None = None
    chance_error: float | None = None
    #: classes whose images are recognised no more often than chance (`unlearnt_classes`)
    unlearnt: list[int] | None = None

    def describe(self) -> str:
        base = (f"predicts {self.classes_predicted} of {self.num_classes} classes (the most "
                f"frequent takes {self.top_class_share:.0%} of the images"
                + ("" if self.rarest_class_share is None else
                   f", the least frequent {self.rarest_class_share:.2f} of its fair share")
                + ")" + ("" if self.top1_error is None else
                         f", top-1 error {self.top1_error:.1%} (chance {self.chance_error:.1%})")
                + ("" if self.unlearnt is None else f", {len(self.unlearnt)} class(es) not learnt")
                + f", posterior spread {self.posterior_spread:.2f}")
        return f"COLLAPSED: {self.reason}; {base}" if self.collapsed else base


def prediction_stats(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(5, K) float64 sums over images: per class its top-1 predictions, p, p^2, its
    images (true labels) and its images predicted as it (hits). Sums, so the shares of
    distributed workers add up (`health_of` turns them into a verdict)."""
    probs, labels = np.asarray(probs), np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"need probs (N, K) and labels (N,), got {probs.shape} and {labels.shape}")
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    p_sum, p_sq = np.zeros(k), np.zeros(k)
    for s in range(0, len(probs), _CHUNK):  # float64 blocks bound the (rows, K) temporaries
        block = probs[s:s + _CHUNK].astype(np.float64)
        p_sum += block.sum(axis=0)
        p_sq += (block * block).sum(axis=0)
    return np.stack([np.bincount(pred, minlength=k), p_sum, p_sq, np.bincount(labels, minlength=k),
                     np.bincount(labels[pred == labels], minlength=k)]).astype(np.float64)


def unlearnt_classes(stats: np.ndarray) -> np.ndarray:
    """Classes present in the validation set whose images the net recognises no more often
    than chance: had its predictions of class c fallen on images regardless of their class,
    each would hit one of c's n_c images with probability n_c / N, so the hits of c would be
    Binomial(predictions of c, n_c / N). A class is learnt when its hits are clearly above
    that (`_above_chance` at CLASS_ALPHA): a class never predicted is not; one predicted
    at a tenth of its fair share, mostly correctly, is."""
    pred, _, _, true, hits = np.asarray(stats, dtype=np.float64)
    present = true > 0
    learnt = _above_chance(hits, pred, true / max(true.sum(), 1.0), CLASS_ALPHA)
    return np.flatnonzero(present & ~learnt)


def health_of(stats: np.ndarray) -> Health:
    """The collapse verdict from `prediction_stats` sums (of softmax posteriors). Collapsed
    when any of: the posteriors hardly vary across images (MIN_POSTERIOR_SPREAD); the top-1
    error is not clearly below chance (the hits are not clearly above those of always
    guessing the most frequent class, `_above_chance` at CHANCE_ALPHA); more than
    MAX_UNLEARNT_SHARE of the classes (and at least one) are not learnt (`unlearnt_classes`)."""
    counts, p_sum, p_sq, true, hits = np.asarray(stats, dtype=np.float64)
    n, k = counts.sum(), len(counts)
    if n <= 0:
        raise ValueError("no images: cannot judge a net's predictions")
    mean = p_sum / n
    std = np.sqrt(np.maximum(p_sq / n - mean * mean, 0.0))
    spread = float(std.mean() * k)
    error, chance = 1.0 - hits.sum() / n, 1.0 - true.max() / n
    unlearnt = unlearnt_classes(stats)
    reasons = []
    if spread < MIN_POSTERIOR_SPREAD:
        reasons.append("nearly the same posteriors for every image")
    if not _above_chance(hits.sum(), n, 1.0 - chance, CHANCE_ALPHA):
        reasons.append(f"top-1 error {error:.1%} is not clearly below chance ({chance:.1%})")
    if unlearnt.size > max(0, int(MAX_UNLEARNT_SHARE * (true > 0).sum())):
        shown = ", ".join(map(str, unlearnt[:10])) + (", ..." if unlearnt.size > 10 else "")
        reasons.append(f"{unlearnt.size} of {k} classes not learnt (class{'es' if unlearnt.size > 1 else ''} "
                       f"{shown}: never or almost never predicted, or their images recognised "
                       "no more often than chance)")
    return Health(bool(reasons), int((counts > 0).sum()), k, float(counts.max() / n), spread,
                  "; ".join(reasons), float(counts.min() / (n / k)), float(error), float(chance),
                  unlearnt.tolist())


def health(post: Posteriors) -> Health:
    """`health_of` the posteriors of one evaluation."""
    return health_of(prediction_stats(post.probs, post.labels))


# ------------------------------------------------------------------ uncertainty
def bootstrap_errors(hits: dict[str, np.ndarray], samples: int = 1000, seed: int = 0,
                     chunk: int = 100) -> dict[str, np.ndarray]:
    """Bootstrap replicates of the error of each member: name -> (samples,) fractions.

    `hits`: name -> (N,) bool, per image whether the member got it right, all over the
    same N images in the same order. Every member is scored on the *same* resamples of
    the images (seeded), so replicates of two members can be subtracted: that is the
    paired bootstrap of their difference. Deterministic for a given (N, samples, seed).
    """
    if not hits:
        return {}
    names = list(hits)
    shapes = {np.shape(hits[m]) for m in names}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or next(iter(shapes))[0] == 0:
        raise ValueError(f"bootstrap needs hits of the same N > 0 images for every member, "
                         f"got shapes {sorted(shapes)}")
    h = np.stack([np.asarray(hits[m], dtype=np.float64) for m in names])  # (M, N)
    n = h.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty((len(names), samples))
    for s in range(0, samples, chunk):
        b = min(chunk, samples - s)
        idx = rng.integers(0, n, size=(b, n)) + np.arange(b)[:, None] * n
        weights = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)  # (b, N) counts
        out[:, s:s + b] = 1.0 - (h @ weights.T) / n
    return dict(zip(names, out))


def interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the replicates."""
    a = (1.0 - confidence) / 2
    lo, hi = np.quantile(np.asarray(replicates), [a, 1.0 - a])
    return float(lo), float(hi)


# ------------------------------------------------------------------ averaging
def average(posts: Sequence[Posteriors], weights: Sequence[float] | None = None,
            names: Sequence[str] | None = None) -> Posteriors:
    """Weighted mean of softmax posteriors: multi-crop, multi-scale, dense+crop, fusion.

    Members must cover the same images with the same labels and the same class
    list; rows are aligned by key to the first member's order (a member in a
    different order is reordered). Otherwise a FusionError lists every problem,
    naming the member (`names`, default "#0", "#1", ...). Weights default to equal.
    """
    if not posts:
        raise ValueError("average() needs at least one Posteriors")
    names = [f"#{i}" for i in range(len(posts))] if names is None else [str(x) for x in names]
    if len(names) != len(posts) or len(set(names)) != len(names):
        raise ValueError(f"need {len(posts)} unique names, got {names}")
    w = np.ones(len(posts)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(posts),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(posts)} finite values >= 0 with a positive sum, got {weights}")
    ref = posts[0]
    problems, rows = [], []
    for post, name in zip(posts[1:], names[1:]):
        idx, found = _align(ref, post, names[0], name)
        problems += found
        rows.append(idx)
    if problems:
        raise FusionError(problems)
    # float64 accumulation, divided by the total weight last: equal members come back exactly
    acc = ref.probs.astype(np.float64) * w[0]
    for post, idx, wi in zip(posts[1:], rows, w[1:]):
        acc += (post.probs if idx is None else post.probs[idx]) * wi
    return Posteriors(ref.keys, ref.labels, (acc / w.sum()).astype(np.float32), ref.classes)


def _align(ref: Posteriors, post: Posteriors, ref_name: str, name: str) -> tuple[np.ndarray | None, list[str]]:
    """Row index putting `post` in `ref`'s key order (None: already aligned), and the problems found."""
    problems = _class_problems(ref.classes, post.classes, ref_name, name)
    if post.keys == ref.keys:  # the usual case: no dict, no reindexing
        rows = np.arange(len(ref))
        problems += _label_problems(ref, post, rows, rows, ref_name, name)
        return None, problems
    pos = {k: i for i, k in enumerate(post.keys)}
    missing = [k for k in ref.keys if k not in pos]
    if missing:
        problems.append(f"member {name!r}: {len(missing)} of the {len(ref)} keys of {ref_name!r} "
                        f"are missing ({_examples(missing)})")
    ref_set = set(ref.keys)
    extra = [k for k in post.keys if k not in ref_set]
    if extra:
        problems.append(f"member {name!r}: {len(extra)} keys not in {ref_name!r} ({_examples(extra)})")
    common = [(i, pos[k]) for i, k in enumerate(ref.keys) if k in pos]
    ref_rows, idx = (np.array([c[j] for c in common], dtype=np.int64) for j in (0, 1))
    problems += _label_problems(ref, post, ref_rows, idx, ref_name, name)
    return idx, problems


def _label_problems(ref: Posteriors, post: Posteriors, ref_rows: np.ndarray, rows: np.ndarray,
                    ref_name: str, name: str) -> list[str]:
    """Keys (rows `ref_rows` of `ref` = rows `rows` of `post`) whose label differs."""
    a, b = ref.labels[ref_rows], post.labels[rows]
    diff = np.flatnonzero(a != b)
    if not diff.size:
        return []
    shown = ", ".join(f"key {ref.keys[ref_rows[i]]!r}: {a[i]} in {ref_name!r}, {b[i]} in {name!r}"
                      for i in diff[:_N_EXAMPLES])
    more = ", ..." if diff.size > _N_EXAMPLES else ""
    return [f"member {name!r}: labels differ from {ref_name!r} for {diff.size} keys ({shown}{more})"]


def _class_problems(ref: list[str], other: list[str], ref_name: str, name: str) -> list[str]:
    if ref == other:
        return []
    head = f"member {name!r}: class list differs from {ref_name!r}"
    if len(ref) != len(other):
        ref_set, other_set = set(ref), set(other)
        only_ref = [c for c in ref if c not in other_set]
        only_other = [c for c in other if c not in ref_set]
        detail = f"{len(other)} classes vs {len(ref)}"
        if only_ref:
            detail += f"; {len(only_ref)} only in {ref_name!r} ({_examples(only_ref)})"
        if only_other:
            detail += f"; {len(only_other)} only in {name!r} ({_examples(only_other)})"
        return [f"{head}: {detail}"]
    i = next(j for j, (x, y) in enumerate(zip(ref, other)) if x != y)
    kind = "same classes in a different order" if set(ref) == set(other) else "different classes"
    return [f"{head}: {kind}, first difference at index {i}: {ref[i]!r} in {ref_name!r}, "
            f"{other[i]!r} in {name!r}"]
