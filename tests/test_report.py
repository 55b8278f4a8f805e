"""Results a researcher can trust: bootstrap intervals, the claims' verdicts, the small-scale
test scales, the collapse detector, and the report built from saved posteriors alone."""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipeline.config import ReportConfig
from pipeline.storage import StageOutput, write_json
from vgg.artifacts import Evaluation, write_evaluation
from vgg.paper import MODES, at_crop, multi_test_scales, scales_for_testing, single_test_scale
from vgg.results import claims
from vgg.results.claims import Comparison, judge, verdict
from vgg.results.metrics import (MIN_POSTERIOR_SPREAD, Posteriors, bootstrap_errors, health, health_of, interval,
                                 prediction_stats, topk_hits)
from vgg.results.report import build_report
from vgg.results.tables import EvalRow, FusionRow, paper_test_q

N = 2000


def hits_with(rate: float, n: int = N, seed: int = 1) -> np.ndarray:
    """Exactly round(rate * n) hits, in a seeded random order."""
    h = np.zeros(n, dtype=bool)
    h[: round(rate * n)] = True
    return np.random.default_rng(seed).permutation(h)


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_interval_has_the_binomial_width_and_is_deterministic():
    reps = bootstrap_errors({"m": hits_with(0.75)}, samples=2000, seed=0)["m"]
    lo, hi = interval(reps)
    se = np.sqrt(0.25 * 0.75 / N)  # binomial standard error of a 25% error rate
    assert lo < 0.25 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    again = bootstrap_errors({"m": hits_with(0.75)}, samples=2000, seed=0)["m"]
    assert np.array_equal(reps, again)
    assert not np.array_equal(reps, bootstrap_errors({"m": hits_with(0.75)}, samples=2000, seed=1)["m"])


def test_every_member_sees_the_same_resamples():
    h = hits_with(0.6)
    reps = bootstrap_errors({"a": h, "b": h.copy(), "c": hits_with(0.3)}, samples=500, seed=3)
    assert np.array_equal(reps["a"], reps["b"])  # same images, same resamples
    # the member set does not change a member's replicates
    assert np.array_equal(reps["a"], bootstrap_errors({"a": h}, samples=500, seed=3)["a"])


def test_paired_difference_excludes_zero_for_a_better_member_and_not_for_a_copy():
    worse = hits_with(0.70)
    better = worse.copy()
    better[np.flatnonzero(~worse)[:100]] = True  # right on 100 more images (5 points), never worse
    reps = bootstrap_errors({"better": better, "worse": worse, "copy": worse.copy()}, samples=1000)
    lo, hi = interval(reps["better"] - reps["worse"])
    assert hi < 0 and lo > -0.1
    assert verdict(100 * lo, 100 * hi) == "held"
    lo, hi = interval(reps["copy"] - reps["worse"])
    assert lo <= 0 <= hi
    assert verdict(100 * lo, 100 * hi) == "inconclusive"


def test_bootstrap_rejects_members_of_different_sizes():
    with pytest.raises(ValueError, match="same N"):
        bootstrap_errors({"a": np.ones(10, bool), "b": np.ones(9, bool)})


def test_topk_hits_count_nan_rows_as_misses():
    probs = np.array([[np.nan, 0.5, 0.5], [0.1, 0.8, 0.1]])
    assert topk_hits(probs, np.array([1, 1]), 1).tolist() == [False, True]


# ---------------------------------------------------------------- verdicts
@pytest.mark.parametrize("lo, hi, expect, want", [
    (-3.0, -1.0, "lower", "held"),
    (1.0, 3.0, "lower", "contradicted"),
    (-1.0, 1.0, "lower", "inconclusive"),
    (-3.0, -1.0, "no gain", "contradicted"),  # A-LRN significantly better than A
    (-1.0, 1.0, "no gain", "held"),
    (1.0, 3.0, "no gain", "held"),
])
def test_verdicts(lo, hi, expect, want):
    assert verdict(lo, hi, expect) == want


def row(net, arch, scale, method, scales, top1):
    q = [40] if scales == "single" else [35, 40, 45]
    return EvalRow(net, arch, scale, method, scales, q, top1)


def ladder_rows() -> list[EvalRow]:
    rows = []
    for net, arch, scale in (("A", "A", 40), ("A-LRN", "A-LRN", 40), ("B", "B", 40), ("C", "C", 40),
                             ("D", "D", 40), ("D-jit", "D", (36, 64))):
        for scales in ("single", "multi"):
            for method in ("dense", "multi-crop", "multi-crop+dense"):
                rows.append(row(net, arch, scale, method, scales, 20.0))
    return rows


def test_comparisons_cover_every_claim_the_plan_allows():
    rows = ladder_rows()
    errors = {r.member_id: 0.2 for r in rows}
    errors["D:multi-crop+dense@multi"] = 0.1
    comps = claims.comparisons(rows, FusionRow(["D:multi-crop+dense@multi", "D-jit:dense@multi"], 9.0), errors)
    labels = {c.claim: [] for c in comps}
    for c in comps:
        labels[c.claim].append(c.label)
    assert labels[1] == ["A-LRN:dense@single vs A:dense@single"]
    assert labels[2] == ["B:dense@single vs A:dense@single", "C:dense@single vs B:dense@single",
                         "D:dense@single vs B:dense@single", "D:dense@single vs C:dense@single"]
    assert labels[3] == ["D-jit:dense@single vs D:dense@single"]
    crops = claims.comparisons(rows, None, errors, mode="multi-crop@single")
    assert [c.label for c in crops if c.claim == 1] == ["A-LRN:multi-crop@single vs A:multi-crop@single"]
    no_b = [r for r in rows if r.arch != "B"]  # then C and D are compared with A
    assert [c.label for c in claims.comparisons(no_b, None, {}) if c.claim == 2] == [
        "C:dense@single vs A:dense@single", "D:dense@single vs A:dense@single",
        "D:dense@single vs C:dense@single"]
    assert len(labels[4]) == 3 * 6 and "D:dense@multi vs D:dense@single" in labels[4]
    assert labels[5] == ["fusion vs D:multi-crop+dense@multi"]  # the best member
    assert next(c for c in comps if c.claim == 1).expect == "no gain"


def test_claims_without_comparisons_are_not_testable_and_name_what_they_need():
    rows = [r for r in ladder_rows() if r.net in ("A", "B")]
    comps = claims.comparisons(rows, None, {})
    reps = {m: np.full(10, 0.2) for m in {r.member_id for r in rows}}
    judged = judge(comps, reps, {m: 0.2 for m in reps})
    missing = {r.claim: r.note for r in judged if r.verdict == "not testable"}
    assert set(missing) == {1, 3, 5}
    assert "A-LRN" in missing[1] and "jittered" in missing[3] and "fuse" in missing[5]
    summary = claims.summary(judged)
    assert summary[2] == "inconclusive" and summary[5] == "not testable"


def test_a_comparison_with_a_collapsed_net_tests_nothing_and_metrics_are_mlflow_safe():
    reps = {"B:dense@single": np.linspace(0.10, 0.12, 50), "A:dense@single": np.linspace(0.20, 0.22, 50)}
    point = {"B:dense@single": 0.11, "A:dense@single": 0.21}
    judged = judge([Comparison(2, "B:dense@single", "A:dense@single")], reps, point, collapsed=["A"])
    r = next(x for x in judged if x.claim == 2)
    # the interval is far below 0, yet a collapsed net cannot hold (nor contradict) a claim
    assert r.verdict == "not testable" and r.diff == pytest.approx(-10.0) and r.note == "collapsed: A"
    metrics, tags = claims.metrics_and_tags(judged)
    assert metrics["claim2.B_dense_single_vs_A_dense_single.diff"] == pytest.approx(-10.0)
    assert tags["claim2"] == "not testable (collapsed: A; retrain A)" and tags["claim1"] == "not testable"
    # with a healthy comparison beside it, the summary keeps its verdict and names the net to fix
    reps["C:dense@single"], point["C:dense@single"] = np.linspace(0.05, 0.07, 50), 0.06
    both = judge([Comparison(2, "B:dense@single", "A:dense@single"),
                  Comparison(2, "C:dense@single", "B:dense@single")], reps, point, collapsed=["A"])
    assert claims.summary(both)[2] == "held; 1 comparison not testable (collapsed: A; retrain A)"
    import re
    assert all(re.fullmatch(r"[A-Za-z0-9_.\- /]+", k) for k in [*metrics, *tags])


# ---------------------------------------------------------------- test scales
def test_q_sets_at_crop_224_are_the_papers():
    assert scales_for_testing(256, 256, 224) == (256, [224, 256, 288])
    assert scales_for_testing(384, 384, 224) == (384, [352, 384, 416])
    assert scales_for_testing(256, 512, 224) == (384, [256, 384, 512])
    assert paper_test_q(256, "multi") == [224, 256, 288] and paper_test_q("256-512", "single") == [384]


def test_q_sets_scale_with_the_crop():
    assert at_crop(32, 224) == 32 and at_crop(32, 32) == 5 and at_crop(32, 64) == 9
    # S = 40 at crop 32: the literal +-32 gave {32, 40, 72}; scaled, Q stays near S
    assert multi_test_scales(40, 32) == [35, 40, 45] and single_test_scale(40, 32) == 40
    assert multi_test_scales((36, 64), 32) == [36, 50, 64]
    assert multi_test_scales(33, 32) == [32, 33, 38]  # a Q below the crop is raised to it


# ---------------------------------------------------------------- collapse
def posteriors_predicting(pred: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N, K) softmax posteriors, seeded noise, whose top-1 prediction is exactly `pred`."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((len(pred), k), dtype=np.float32)
    logits[np.arange(len(pred)), pred] = logits.max(1) + rng.uniform(0.5, 3.0, len(pred))
    logits -= logits.max(1, keepdims=True)  # in place: 1000 classes x 50,000 images is 200 MB
    np.exp(logits, out=logits)
    logits /= logits.sum(1, keepdims=True)
    return logits


def judged(pred: np.ndarray, labels: np.ndarray, k: int, seed: int = 0):
    return health_of(prediction_stats(posteriors_predicting(pred, k, seed), labels))


def test_collapse_detector_on_a_constant_net_and_a_healthy_one():
    rng = np.random.default_rng(0)
    k, n = 5, 200
    labels = np.arange(n) % k
    const = np.tile(rng.dirichlet(np.ones(k)), (n, 1)).astype(np.float32)
    h = health(Posteriors([str(i) for i in range(n)], labels, const, list("abcde")))
    assert h.collapsed and h.classes_predicted == 1 and h.posterior_spread < 1e-3
    assert "nearly the same posteriors" in h.reason and "COLLAPSED" in h.describe()
    logits = 4.0 * np.eye(k)[labels] + rng.normal(size=(n, k))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    good = health(Posteriors([str(i) for i in range(n)], labels, probs, list("abcde")))
    assert not good.collapsed and good.classes_predicted == k and good.posterior_spread > 1
    assert good.unlearnt == [] and good.chance_error == pytest.approx(0.8)


def test_a_net_at_chance_is_collapsed_though_it_predicts_every_class():
    k, n = 5, 200
    labels = np.arange(n) % k
    h = judged(np.random.default_rng(3).integers(0, k, n), labels, k)
    assert h.collapsed and h.classes_predicted == k and h.posterior_spread > MIN_POSTERIOR_SPREAD
    assert "is not clearly below chance (80.0%)" in h.reason


def test_the_demos_old_broken_d_and_a_class_never_predicted_are_collapsed():
    rng = np.random.default_rng(26)
    k, n = 5, 200  # the demo's validation set
    labels = np.arange(n) % k
    # issue 26's D on one machine: only classes 0 and 1 predicted, the others' images spread over them
    pred = np.where(labels < 2, np.where(rng.random(n) < 0.9, labels, 1 - labels), rng.integers(0, 2, n))
    d = judged(pred, labels, k)
    assert d.collapsed and d.classes_predicted == 2 and d.unlearnt == [2, 3, 4]
    assert "3 of 5 classes not learnt (classes 2, 3, 4" in d.reason
    # issue 26's D at 21% error: class 3 never predicted (its images go to class 1), the rest 98% right
    wrong = rng.random(n) >= 0.98
    pred = np.where(wrong, (labels + 1 + rng.integers(0, k - 1, n)) % k, labels)
    pred = np.where(labels == 3, 1, np.where(pred == 3, 2, pred))
    four = judged(pred, labels, k)
    assert 0.2 <= four.top1_error <= 0.23
    assert four.collapsed and four.classes_predicted == 4 and four.unlearnt == [3]
    assert four.reason.startswith("1 of 5 classes not learnt (class 3: never or almost never predicted")
    # predicted a few times, at random: not learnt either
    pred[np.flatnonzero(labels == 0)[:3]] = 3
    assert judged(pred, labels, k).unlearnt == [3]


@pytest.mark.parametrize("per_class", [60, 200])
@pytest.mark.parametrize("share", [0.07, 0.2])
def test_a_hard_confusable_class_under_predicted_is_not_a_collapse(per_class, share):
    """Issue 32: on a 10-class set every net at 22-26% error predicted one hard, easily confused
    class at 7-20% of its fair share, and the old rule (under 25% of it) called each collapsed.
    Here class 7 is predicted round(share * n) times, three quarters of them right; the rest of
    its images go to its twin, class 8; every other class is right 87% of the time."""
    k, hard, twin = 10, 7, 8
    rng = np.random.default_rng([per_class, round(100 * share)])
    labels = np.repeat(np.arange(k), per_class)
    others = np.array([[c for c in range(k) if c not in (i, hard)][:k - 2] for i in range(k)])
    wrong = np.concatenate([rng.permutation(per_class) < round(0.13 * per_class) for _ in range(k)])
    pred = np.where(wrong, others[labels, rng.integers(0, k - 2, labels.size)], labels)
    predicted = round(share * per_class)
    right = round(0.75 * predicted)
    mine, twins = np.flatnonzero(labels == hard), np.flatnonzero((labels == twin) & (pred == twin))
    pred[mine] = twin
    pred[mine[:right]] = hard
    pred[twins[:predicted - right]] = hard  # the twin's images taken for the hard class
    h = judged(pred, labels, k, seed=per_class)
    assert 0.2 <= h.top1_error <= 0.25
    assert h.rarest_class_share == pytest.approx(predicted / per_class)
    assert h.rarest_class_share < 0.25  # what the old rule called "almost never predicted"
    assert not h.collapsed, h.reason
    assert h.unlearnt == [] and "COLLAPSED" not in h.describe()


def test_a_healthy_net_of_1000_classes_with_50_images_each_is_not_collapsed():
    """ImageNet's validation set: a net at about 30% top-1 error whose classes' recall spreads
    (Beta, mean 0.7, sd 0.17), errors going mostly to similar classes (the same block of 10),
    and three near-duplicate classes whose twins take all their images: a few classes are
    never predicted, many far less than their fair share; not a collapse. The same net that
    gave up half its classes is one."""
    rng = np.random.default_rng(1000)
    k, per_class = 1000, 50
    labels = np.repeat(np.arange(k), per_class)
    recall = rng.beta(4.34, 1.86, k)
    recall[[10, 20, 30]] = 0.0  # near-duplicates of 11, 21, 31
    block = labels // 10 * 10
    near = np.where(rng.random(labels.size) < 0.7, block + rng.integers(0, 10, labels.size),
                    rng.integers(0, k, labels.size))
    near = np.where(near == labels, (labels + 1) % k, near)
    pred = np.where(rng.random(labels.size) < recall[labels], labels, near)
    pred[np.isin(labels, [10, 20, 30])] = labels[np.isin(labels, [10, 20, 30])] + 1
    pred = np.where(np.isin(pred, [10, 20, 30]), pred + 1, pred)  # nothing is ever taken for them
    h = judged(pred, labels, k)
    assert 0.27 <= h.top1_error <= 0.33
    assert h.classes_predicted == k - 3 and h.rarest_class_share == 0.0
    counts = np.bincount(pred, minlength=k)
    assert (counts < 0.25 * per_class).sum() > 3  # the old rule's "almost never predicted" classes
    assert not h.collapsed, h.reason
    assert {10, 20, 30} <= set(h.unlearnt) and len(h.unlearnt) <= 10
    # the same net that never predicts classes 500-999 (their images go to the class 500 below)
    half = judged(np.where(pred >= 500, pred - 500, pred), labels, k)
    assert half.collapsed and "not learnt" in half.reason and half.classes_predicted <= 500


def test_prediction_stats_of_shares_add_up():
    rng = np.random.default_rng(1)
    probs, labels = rng.dirichlet(np.ones(4), size=30), rng.integers(0, 4, 30)
    whole = prediction_stats(probs, labels)
    assert whole.shape == (5, 4) and whole[3].sum() == 30
    assert np.allclose(prediction_stats(probs[:12], labels[:12]) + prediction_stats(probs[12:], labels[12:]), whole)
    assert whole[4].sum() == (probs.argmax(1) == labels).sum()


# ---------------------------------------------------------------- the report from posteriors
def _output(root, sid: str) -> StageOutput:
    path = str(root / sid.replace("/", "_"))
    pafs.LocalFileSystem().create_dir(path, recursive=True)
    return StageOutput(sid, "k", pafs.LocalFileSystem(), path, path)


def fake_evaluation(root, net: str, arch: str, scale, accuracy: float, classes: int = 10,
                    n: int = 400, mode_accuracy: dict[str, float] | None = None,
                    never: int | None = None, crop: int | None = None,
                    never_in: tuple[str, ...] = MODES) -> Evaluation:
    """An evaluation (written as the evaluate stage writes it) with posteriors of every mode.
    `mode_accuracy`: other accuracies for some modes; `never`: a class the net never
    predicts (its images go to the next class) in the modes `never_in`; `crop`: recorded
    in the manifest."""
    out = _output(root, f"evaluate/{net}")
    rng = np.random.default_rng([ord(c) for c in net])
    labels = np.arange(n) % classes
    rows, modes = [], {}
    if crop is not None:
        write_json(out.fs, out.join("manifest.json"), {"crop": crop})
    for mode in MODES:
        acc = (mode_accuracy or {}).get(mode, accuracy)
        pred = np.where(rng.random(n) < acc, labels, (labels + 1) % classes)
        if never is not None and mode in never_in:
            pred = np.where(pred == never, (never + 1) % classes, pred)
        probs = np.full((n, classes), 0.2 / (classes - 1), np.float32)
        probs[np.arange(n), pred] = 0.8
        modes[mode] = Posteriors([f"k{i:04d}" for i in range(n)], labels, probs, [f"c{i}" for i in range(classes)])
        method, scales = mode.split("@")
        err = 100.0 * (1 - (pred == labels).mean())
        rows.append(row(net, arch, scale, method, scales, err))
    write_evaluation(out, modes, rows, health(modes["dense@single"]))
    return Evaluation(out)


def test_report_judges_claims_from_saved_posteriors(tmp_path):
    outputs = {"A": fake_evaluation(tmp_path, "A", "A", 40, 0.6),
               "B": fake_evaluation(tmp_path, "B", "B", 40, 0.9)}
    report = build_report(outputs, None, tmp_path / "p.png", ReportConfig(bootstrap_samples=200))
    t3 = report.tables["table3.json"]
    assert all(ci.startswith("[") for ci in t3["top-1 95% CI"])
    b_vs_a = next(r for r in report.claims if r.claim == 2)
    assert b_vs_a.verdict == "held" and b_vs_a.hi < 0
    assert "The paper's claims" in report.markdown and "**Claim 2.**" in report.markdown
    again = build_report(outputs, None, None, ReportConfig(bootstrap_samples=200))
    assert again.claims == report.claims  # seeded: the same intervals every time


def test_top5_with_five_classes_is_not_applicable(tmp_path):
    outputs = {"A": fake_evaluation(tmp_path, "A", "A", 40, 0.6, classes=5)}
    for r in build_report(outputs).tables["table3.json"]["top-5 95% CI"]:
        assert r is None
    assert "n/a" in build_report(outputs).markdown


def test_a_partially_collapsed_net_makes_its_claims_not_testable_in_the_report(tmp_path):
    # D is the better net by its errors, but it never predicts class 3 (issue 26: D at 21%)
    outputs = {"A": fake_evaluation(tmp_path, "A", "A", 40, 0.6, classes=5),
               "D": fake_evaluation(tmp_path, "D", "D", 40, 0.85, classes=5, never=3)}
    report = build_report(outputs, None, None, ReportConfig(bootstrap_samples=200))
    assert report.collapsed == ["D"]
    d_vs_a = next(r for r in report.claims if r.claim == 2)
    assert d_vs_a.verdict == "not testable" and d_vs_a.note == "collapsed: D" and d_vs_a.diff < 0
    assert claims.summary(report.claims)[2] == "not testable (collapsed: D; retrain D)"
    assert "1 of 5 classes not learnt (class 3: never or almost never predicted" in report.markdown


def test_collapse_is_judged_in_the_compared_mode_and_the_report_agrees_with_health_json(tmp_path):
    """Issue 32: health.json judged the best mode only (A "not collapsed"), the report the
    compared mode (A "collapsed"). Now health.json holds every mode's health, the report
    uses the compared mode's, and both come from one function."""
    outputs = {"A": fake_evaluation(tmp_path, "A", "A", 40, 0.6, classes=5),
               # D gave up class 3 in the compared mode only, E in a mode no claim compares
               "D": fake_evaluation(tmp_path, "D", "D", 40, 0.85, classes=5, never=3, never_in=("dense@single",)),
               "E": fake_evaluation(tmp_path, "E", "E", 40, 0.85, classes=5, never=3,
                                    never_in=("multi-crop+dense@multi",))}
    report = build_report(outputs, None, None, ReportConfig(bootstrap_samples=200))
    assert report.compare_mode == "dense@single" and report.collapsed == ["D"]
    d, e = outputs["D"], outputs["E"]
    assert d.health("dense@single").collapsed and not d.health("multi-crop@single").collapsed
    assert f"D in dense@single: {d.health('dense@single').reason}" in report.markdown
    assert e.health("multi-crop+dense@multi").collapsed and not e.health("dense@single").collapsed
    for net, ev in outputs.items():  # the report's verdict in its mode is health.json's for that mode
        assert ev.health(report.compare_mode).collapsed == (net in report.collapsed)
        assert ev.health() == ev.health("dense@single")  # the best mode's (as written here)


def test_dense_far_from_multi_crop_is_distorted_and_verdicts_move_to_multi_crop(tmp_path):
    # issue 26 at crop 32: dense@single scored D at 58% error, multi-crop@single at 23%
    bad_dense = {"dense@single": 0.42, "multi-crop+dense@single": 0.5}
    outputs = {"A": fake_evaluation(tmp_path, "A", "A", 40, 0.6, mode_accuracy={"dense@single": 0.55}, crop=32),
               "D": fake_evaluation(tmp_path, "D", "D", 40, 0.78, mode_accuracy=bad_dense, crop=32)}
    report = build_report(outputs, None, None, ReportConfig(bootstrap_samples=200))
    assert list(report.distorted) == ["single"] and report.distorted["single"].startswith("D: dense@single")
    assert report.compare_mode == "multi-crop@single"
    d_vs_a = next(r for r in report.claims if r.claim == 2)
    assert d_vs_a.comparison == "D:multi-crop@single vs A:multi-crop@single" and d_vs_a.verdict == "held"
    c4 = {r.comparison: r for r in report.claims if r.claim == 4}
    assert c4["D:dense@multi vs D:dense@single"].verdict == "not testable"
    assert c4["D:dense@multi vs D:dense@single"].note == "dense distorted at crop 32"
    assert c4["D:multi-crop+dense@multi vs D:multi-crop@multi"].verdict != "not testable"
    assert "dense evaluation is distorted at crop 32" in report.markdown
    assert "judged in multi-crop@single instead of dense@single" in report.markdown
    # dense and multi-crop within noise of each other: nothing is distorted, nothing moves
    calm = {"A": fake_evaluation(tmp_path / "calm", "A", "A", 40, 0.6),
            "D": fake_evaluation(tmp_path / "calm", "D", "D", 40, 0.78)}
    again = build_report(calm, None, None, ReportConfig(bootstrap_samples=200))
    assert again.distorted == {} and again.compare_mode == "dense@single"


def test_a_reason_shared_by_both_members_is_said_once(tmp_path):
    # the demo's report said "dense distorted at crop 32; dense distorted at crop 32"
    bad = {m: 0.42 for m in ("dense@single", "dense@multi", "multi-crop+dense@single", "multi-crop+dense@multi")}
    outputs = {"D": fake_evaluation(tmp_path, "D", "D", 40, 0.78, mode_accuracy=bad, crop=32)}
    report = build_report(outputs, None, None, ReportConfig(bootstrap_samples=200))
    both = [r for r in report.claims if r.verdict == "not testable" and r.comparison.count("dense@") == 2]
    assert both and all(r.note == "dense distorted at crop 32" for r in both), [r.note for r in both]


def test_the_claims_state_each_claim_once_in_120_columns(tmp_path):
    """Issue 31: claim 4's 110-character statement stood on each of its nine rows, making
    console lines of about 300 characters. Now the statement comes once per claim: above
    its comparisons in the Markdown (results.md, and the console, which prints it), beside
    its first comparison in the MLflow table, whose first columns are the result."""
    bad_dense = {"dense@single": 0.42, "multi-crop+dense@single": 0.5}
    outputs = {"A": fake_evaluation(tmp_path, "A", "A", 40, 0.6, mode_accuracy={"dense@single": 0.55}, crop=32),
               "D": fake_evaluation(tmp_path, "D", "D", 40, 0.78, mode_accuracy=bad_dense, crop=32),
               "D-jit": fake_evaluation(tmp_path, "D-jit", "D", (36, 64), 0.8, never=3)}
    report = build_report(outputs, None, None, ReportConfig(bootstrap_samples=200))
    assert sum(r.claim == 4 for r in report.claims) == 9  # as in the issue
    section = report.markdown[report.markdown.index("## The paper's claims"):]
    assert max(map(len, section.splitlines())) <= 120
    flat = " ".join(section.split())
    for n, statement in claims.CLAIMS.items():
        assert flat.count(statement) == 1, statement
        assert flat.count(f"**Claim {n}.**") == 1
    # every note is there, as a footnote of its claim's table
    for r in report.claims:
        assert not r.note or r.note in flat
    assert "| D-jit:dense@multi vs D-jit:dense@single | " in section
    table = report.tables["claims.json"]
    assert list(table)[:5] == ["claim", "comparison", "difference (pp)", "95% CI", "verdict"]
    assert list(table)[-1] == "statement"
    shown = [(c, s) for c, s in zip(table["claim"], table["statement"]) if s is not None]
    assert shown == list(claims.CLAIMS.items())


def test_the_saved_tables_keep_their_columns_in_order_for_the_parent_runs_display(tmp_path):
    """Issue 31: the parent run logs the report's tables as read back from its JSON files,
    which were written with sorted keys (arch, method, net, paper top-1, ...): MLflow's view
    kept that order and the errors were off the first screen. Read back, a table's columns
    are in the report's order, and the display leaves out the all-empty paper columns."""
    from vgg.artifacts import Report, write_report
    from vgg.results.tables import display

    outputs = {"A": fake_evaluation(tmp_path, "A", "A", 40, 0.6)}
    report = build_report(outputs, None, None, ReportConfig(bootstrap_samples=50))
    out = _output(tmp_path, "report")
    write_report(out, report.tables, report.markdown, [], b"")
    write_json(out.fs, out.join("manifest.json"), {"tables": sorted(report.tables)})
    saved = Report(out).tables()
    assert {n: list(t) for n, t in saved.items()} == {n: list(t) for n, t in report.tables.items()}
    shown = display(saved["table3.json"])
    assert list(shown)[:5] == ["net", "method", "test Q", "top-1", "top-1 95% CI"]
    assert "paper top-1" not in shown and "paper top-5" not in shown  # no row matches the paper
