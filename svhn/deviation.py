"""How far a device's output is from the reference, and whether that is acceptable.

One implementation of the statistics and the verdict for every caller and every network:
`inference.py --compare`, `evaluation/eval_precision.py`, `test_load.py`, the packed CPU path's
self-check and export.py. The network's NetworkSpec names the outputs and says what each image
reads as; each output is compared image by image, flattened.

Rules (Ascend msprobe's compare rules, applied per output to the raw values):
  FAIL when the output holds NaN or Inf; when cosine < 0.9; when max abs error > 1; or when
  cosine < 0.99 and max abs error > 1e-3 at the same time.
For float16 and bfloat16 one more rule, chosen here because an absolute bound means nothing
for a 16-bit format whose error grows with the size of the logits:
  FAIL when max abs error > 4 u * max|reference|, with u the format's unit roundoff
  (2^-11 for float16, 2^-8 for bfloat16): more than four roundings at the head's largest logit.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch


UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ROUNDINGS_ALLOWED = 4

# msprobe's rules: (what the report says, the test on a head's statistics). The report's rule
# text is made from these same entries, so the words cannot drift from the tests.
RULES: list[tuple[str, Callable[[dict], bool]]] = [
    ("NaN/Inf in the output", lambda s: bool(s["nonfinite"]) or not math.isfinite(s["max_abs"]) or not math.isfinite(s["cosine"])),
    ("cosine < 0.9", lambda s: s["cosine"] < 0.9),
    ("max abs > 1", lambda s: s["max_abs"] > 1),
    ("cosine < 0.99 and max abs > 1e-3", lambda s: s["cosine"] < 0.99 and s["max_abs"] > 1e-3),
]


def _low_precision_rule(u: float) -> str:
    return f"max abs > {ROUNDINGS_ALLOWED} u max|ref| ({ROUNDINGS_ALLOWED * u:.3g} of the range)"


def rules_text(dtype: torch.dtype = torch.float32) -> str:
    text = "FAIL if " + ", or ".join(name for name, _ in RULES)
    u = UNIT_ROUNDOFF.get(dtype)
    return text + (f", or {_low_precision_rule(u)}" if u is not None else "")


def head_stats(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """Deviation of one output (N x anything, flattened per image) from the reference, in float64."""
    r = ref.detach().double().cpu().reshape(ref.shape[0], -1)
    o = out.detach().double().cpu().reshape(out.shape[0], -1)
    nonfinite = int((~torch.isfinite(o)).sum())
    d = (o - r).abs()
    flat = d.flatten().numpy()
    if nonfinite:
        flat = np.where(np.isfinite(flat), flat, np.inf)
    worst = int(np.argmax(flat))
    nonzero = r.abs() > 0
    rel = (d[nonzero] / r.abs()[nonzero]) if nonzero.any() else torch.zeros(1, dtype=torch.float64)
    norms = r.norm() * o.norm()
    cosine = float((r.flatten() @ o.flatten()) / norms) if norms > 0 else (1.0 if torch.equal(r, o) else 0.0)
    span = float(r.abs().max())
    with np.errstate(invalid="ignore"):  # Inf stands for NaN here; its percentiles may be NaN
        p99 = float(np.percentile(flat, 99))
    return {
        "mean_abs": float(flat.mean()),
        "median_abs": float(np.median(flat)),
        "p99_abs": p99,
        "max_abs": float(flat[worst]),
        "max_rel": float(rel.max()),
        "max_abs_over_range": float(flat[worst]) / span if span > 0 else float(flat[worst]),
        "reference_range": span,
        "cosine": cosine,
        "argmax_agreement": float((o.argmax(dim=1) == r.argmax(dim=1)).double().mean()),
        "nonfinite": nonfinite,
        "worst_image": worst // r.shape[1],
        "worst_class": worst % r.shape[1],
    }


def failed_rules(stats: dict, dtype: torch.dtype = torch.float32) -> list[str]:
    """The rules a head's statistics break; empty means PASS."""
    failed = [name for name, broken in RULES if broken(stats)]
    u = UNIT_ROUNDOFF.get(dtype)
    if u is not None and stats["max_abs_over_range"] > ROUNDINGS_ALLOWED * u:
        failed.append(_low_precision_rule(u))
    return failed


def failed_summary(report: dict) -> str:
    """The rules any output of a report breaks, each once, as one phrase."""
    return "; ".join(sorted({rule for h in report["heads"].values() for rule in h["failed"]}))


def compare(
    ref: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor],
    spec,
    dtype: torch.dtype = torch.float32,
    images: Sequence[str] | None = None,
) -> dict:
    """Per-output statistics and verdicts, agreement of the final readings (spec.readings), the
    worst image, the verdict."""
    n = ref[0].shape[0]
    images = list(images) if images is not None else [f"#{i}" for i in range(n)]
    heads = {}
    for name, r, o in zip(spec.output_names, ref, out):
        stats = head_stats(r, o)
        stats["worst_image_name"] = images[stats["worst_image"]]
        stats["failed"] = failed_rules(stats, dtype)
        stats["verdict"] = "FAIL" if stats["failed"] else "PASS"
        heads[name] = stats
    ref_numbers = spec.readings(ref)
    out_numbers = spec.readings(out)
    differ = [images[i] for i in range(n) if ref_numbers[i] != out_numbers[i]]
    per_image = torch.stack([(o.double() - r.double()).abs().reshape(n, -1).amax(dim=1) for r, o in zip(ref, out)]).amax(dim=0)
    per_image = torch.nan_to_num(per_image, nan=math.inf)
    worst = int(per_image.argmax())
    return {
        "network": spec.name,
        "dtype": str(dtype).replace("torch.", ""),
        "images": n,
        **(spec.agreement(ref, out) if spec.agreement else {}),
        "rules": rules_text(dtype),
        "heads": heads,
        "whole_number_agreement": (n - len(differ)) / n if n else 1.0,
        "numbers_differ": differ,
        "worst_image": {"image": images[worst], "max_abs": float(per_image[worst])},
        "max_abs": max(h["max_abs"] for h in heads.values()),
        "verdict": "FAIL" if any(h["failed"] for h in heads.values()) else "PASS",
    }


def markdown(report: dict) -> str:
    """The comparison as a Markdown table and a verdict line."""
    lines = [
        "| head | mean abs | median abs | p99 abs | max abs | max rel | cosine | argmax agree | worst (image, class) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in report["heads"].items():
        lines.append(
            f"| {name} | {s['mean_abs']:.2e} | {s['median_abs']:.2e} | {s['p99_abs']:.2e} | {s['max_abs']:.2e} "
            f"| {s['max_rel']:.2e} | {s['cosine']:.6f} | {100 * s['argmax_agreement']:.1f} % "
            f"| {s['worst_image_name']}, {s['worst_class']} | {s['verdict']}{': ' + '; '.join(s['failed']) if s['failed'] else ''} |"
        )
    lines += [
        "",
        f"{'best found box (to the pixel)' if report.get('network') == 'localizer' else 'whole-number'} agreement: "
        f"{100 * report['whole_number_agreement']:.1f} % of {report['images']} images"
        + (f" (differ: {', '.join(report['numbers_differ'][:5])}{', ...' if len(report['numbers_differ']) > 5 else ''})" if report["numbers_differ"] else ""),
        *([f"best found box IoU with the reference's: mean {report['box_iou_mean']:.4f}, min {report['box_iou_min']:.4f}; "
           f"found on one side only: {report['found_differ']} images"] if "box_iou_mean" in report else []),
        f"worst image: {report['worst_image']['image']} (max abs {report['worst_image']['max_abs']:.2e})",
        f"rules: {report['rules']}",
        f"verdict: {report['verdict']}",
    ]
    return "\n".join(lines)
