"""Each paper finding's orientation: results built so the paper holds give "reproduced", the mirror
image gives "contradicted", and too little data gives "inconclusive" (a claim whose comparison is
flipped, or whose threshold is on the wrong side, fails here)."""

from __future__ import annotations

import numpy as np
import pytest

from tailforge.eval.findings import CLAIMS, decide
from tailforge.eval.stats import encode_bits

N = 400


def bits(ones: int, n: int = N) -> str:
    return encode_bits(np.arange(n) < ones)


def results(paper_holds: bool, n: int = N, gap: int = 60) -> dict:
    """Every finding's data, the paper's side (paper_holds) or the other, by `gap` items of `n`."""
    s = 1 if paper_holds else -1
    base = n // 2
    rng = np.random.default_rng(0)
    hardness = rng.normal(0, 1, n)

    def ood(shift: float) -> dict:
        """Per-item OOD scores: ID scores shifted up by `shift` separate better from the OOD sets."""
        far = rng.normal(-1.0, 1.0, n)
        return {"per_item_scores": {"id": {s_: (rng.normal(0.0, 1.0, n) + shift).tolist() for s_ in scores},
                                    "far": {s_: far.tolist() for s_ in scores},
                                    "near": {s_: (far + 0.5).tolist() for s_ in scores}}}

    scores = ("ash", "msp", "react", "scale")

    def accuracy(ones: int) -> dict:
        return {"correct": bits(ones, n)}

    def corruptions(ones: int) -> dict:
        return {"corruptions": {"blur": {"benchmark": True, "effective": True, "severities": [{"correct": bits(ones, n)}]},
                                "none": {"benchmark": True, "effective": False, "severities": [{"correct": bits(0, n)}]},
                                "held_out": {"benchmark": False, "effective": True, "severities": [{"correct": bits(0, n)}]}}}

    return {
        "accuracy": {"real": accuracy(base), "real+baseline": accuracy(base), "real+lowdensity": accuracy(base + s * gap),
                     "real+reconstructed": accuracy(base - s * gap), "real+diffaug": accuracy(base - (0 if s > 0 else gap))},
        "corruptions": {"real": corruptions(base), "real+diffaug": corruptions(base + s * gap),
                        "real+diffaug + DiffAug-Ensemble": corruptions(base + 2 * s * gap)},
        "density": {
            "baseline": {"samples": {"per_sample": {"hardness": hardness.tolist(), "avg_knn": hardness.tolist(),
                                                    "lof": hardness.tolist(), "faithful": bits(n, n),
                                                    "inside_real_manifold": bits(int(0.8 * n), n)}}},
            **{name: {"samples": {"per_sample": {"inside_real_manifold": bits(int(fraction * n), n)}}}
               for name, fraction in (("lowdensity-noisy", 0.5), ("lowdensity-da", 0.5 + s * 0.2))},
            "lowdensity": {"samples": {"per_sample": {
                "hardness": (hardness + s).tolist(), "avg_knn": (hardness + s).tolist(), "lof": (hardness + s).tolist(),
                "faithful": bits(int((0.6 + s * 0.3) * n), n),
                "inside_real_manifold": bits(int((0.4 + s * 0.3) * n), n)}}}},
        "guidance_classifiers": {  # two noise levels, the DA-classifier ahead by `gap` images at each
            "noisy": {"classifier_test_correct": {"0.01": bits(base, n), "2.5": bits(base - gap, n)}},
            "da": {"classifier_test_correct": {"0.01": bits(base + s * gap, n), "2.5": bits(base - gap + s * gap, n)}}},
        "entropy": {"test": {"real": [0.5] * n, "reconstructed": (0.5 - s * 0.1 + 0.01 * rng.random(n)).tolist()}},
        "memorization": {"replicate": bits(0 if paper_holds else n // 4, n)},
        "ood_by_classifier": {name: ood(shift) for name, shift in (
            ("real", 0.0), ("real+diffaug", s * 1.0), ("real+diffaug + DiffAug-Ensemble", s * 2.0))},
    }


def test_every_claim_is_reproduced_when_the_paper_holds():
    rows = decide(results(paper_holds=True))
    assert len(rows) == len(CLAIMS)
    assert [r["verdict"] for r in rows] == ["reproduced"] * len(CLAIMS), [(r["finding"], r["low"], r["high"])
                                                                         for r in rows if r["verdict"] != "reproduced"]


def test_every_claim_is_contradicted_by_the_mirror_image():
    rows = decide(results(paper_holds=False))
    assert [r["verdict"] for r in rows] == ["contradicted"] * len(CLAIMS), [(r["finding"], r["low"], r["high"])
                                                                           for r in rows if r["verdict"] != "contradicted"]


@pytest.mark.parametrize("paper_holds", [True, False])
def test_a_one_item_gap_on_few_items_is_inconclusive_for_classifier_comparisons(paper_holds):
    rows = {r["finding"]: r for r in decide(results(paper_holds, n=40, gap=1))}
    for finding in ("adding low-density samples to real data helps the classifier more than adding baseline samples",
                    "DiffAug raises accuracy on corrupted images"):
        assert rows[finding]["verdict"] == "inconclusive", rows[finding]
        assert rows[finding]["items"] == 40 and rows[finding]["seeds"] == 1


def test_guidance_classifiers_measured_at_other_noise_levels_are_refused():
    from tailforge.gen.core.errors import ConfigError

    data = results(paper_holds=True)
    data["guidance_classifiers"]["da"]["classifier_test_correct"] = {"0.5": bits(10)}
    with pytest.raises(ConfigError, match="guidance classifier 'da' was measured at noise levels"):
        decide(data)
