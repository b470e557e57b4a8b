"""What every result JSON the evaluation commands write says about itself: its kind and the
version of its layout. `tailforge eval report` reads a result by these two fields (not by the keys
it happens to hold), and lists one whose kind or version it does not know as not recognised.
"""

from __future__ import annotations

from typing import Any

#: the current layout version of each kind of result; bump a kind's version when its layout
#: changes in a way the report's reader for it must know about
RESULT_VERSIONS: dict[str, int] = {
    "accuracy": 2,  # tailforge eval accuracy --json (2: per-item "correct")
    "corruptions": 2,  # tailforge eval corruptions: corruptions.json (2: per-item "correct" per severity)
    "density": 2,  # tailforge eval density --json (2: "per_sample" values)
    "emm": 2,  # tailforge eval emm: emm.json (2: EMM over the snapshots' highest ratio, and emm_final)
    "emm_run": 2,  # one training-set size of an EMM study: runs/*/result.json, read through its emm.json
    "emm_study": 1,  # tailforge eval emm-study: emm-study.json (findings across seeds)
    "entropy": 1,  # tailforge eval entropy --json
    "fidelity": 1,  # tailforge eval fidelity: fidelity.json
    "memorization": 2,  # tailforge eval memorization: memorization.json (2: per-sample "replicate")
    "ood": 2,  # tailforge eval ood: ood.json (2: per-item scores)
    "reconstruction": 1,  # tailforge eval reconstruction: reconstruction.json (measurements vs t_re)
}


def tag_result(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` as a result of `kind`: "kind" and its current "version" first, then the fields."""
    if "kind" in body or "version" in body:
        raise ValueError(f"a {kind} result's fields must not include 'kind' or 'version'")
    return {"kind": kind, "version": RESULT_VERSIONS[kind], **body}


def is_current(obj: Any) -> bool:
    """Whether `obj` is a result of a known kind at that kind's current version."""
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str) or obj["kind"] not in RESULT_VERSIONS:
        return False
    return obj.get("version") == RESULT_VERSIONS[obj["kind"]]
