"""The app's verdicts, in plain words: what a calibration kept, and how an evaluation came out."""

from __future__ import annotations

from ..calibration.calibrate import CalibrationReport, describe_choice
from ..evaluation.evaluate import EvaluationReport


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def calibration_verdict(report: CalibrationReport) -> str:
    """The calibration report's verdict in plain words, first: what calibration kept and why."""
    return f"Verdict: {report.verdict()}"


def recorded_verdict(calibration: dict | None) -> str:
    """A loaded gate's verdict, from the calibration record saved with it, in the words of a fresh calibration; then
    what it was calibrated on. A record from another version, or edited by hand, gives what it can."""
    if not calibration:
        return "Verdict: this gate came without a calibration record, so what it kept and why is not known."
    try:
        text = "Verdict: " + describe_choice(
            str(calibration["chosen"]),
            {str(k): float(v) for k, v in calibration["cross_validated_accuracy"].items()},
            {str(k): float(v) for k, v in (calibration.get("cross_validated_spread") or {}).items()},
            int(calibration.get("folds") or 5),
            str(calibration.get("best_single_backbone", "?")),
            calibration.get("images") if isinstance(calibration.get("images"), int) else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        text = f"Verdict: {calibration.get('why') or 'not recorded'}"

    def words(value) -> str:  # a dict as "key value, key value", as the report prints its settings
        return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)

    details = [
        f"{key.replace('_', ' ')}: {words(calibration[key])}"
        for key in ("dataset", "shots", "images", "seed", "settings", "backbone_accuracy")
        if calibration.get(key) not in (None, "", {})
    ]
    return text + ("\n\nCalibration record:\n" + "\n".join(f"  {line}" for line in details) if details else "")


def verdict(report: EvaluationReport) -> str:
    """Plain words on an evaluation: does the gate beat the mean of logits and the best single backbone here, by how much."""
    top1 = {row["method"]: row["top1"] for row in report.rows()}
    gate = top1.get(report.gate_method)
    averaging = top1.get("mean of logits")
    backbones = {name: top1[name] for name in report.backbones if name in top1}
    if report.best_single in backbones:
        best_name, best_what = report.best_single, "the backbone chosen on the calibration data"
    else:
        best_name = max(backbones, key=backbones.get)
        best_what = "the best backbone on these images (picked with their labels: a generous comparison)"
    best = backbones[best_name]
    n = len(report.labels)

    def versus(name: str, accuracy: float) -> str:
        diff = 100 * (gate - accuracy)
        if abs(diff) < 1e-9:
            return f"ties with {name} ({_percent(accuracy)})"
        return f"{'beats' if diff > 0 else 'loses to'} {name} ({_percent(accuracy)}) by {abs(diff):.1f} points"

    head = f"**Verdict on {n} images:** the gate scores {_percent(gate)} top-1; it {versus('the mean of logits', averaging)}"
    head += f" and {versus(f'{best_what}, {best_name},', best)}."
    if report.gate_method != "gate":
        head += " The gate is not calibrated: it is the mean of logits. Calibrate it first to compare."
    if n < 50:
        head += f" With {n} images, one image is {100 / n:.1f} points: treat small differences as noise."
    return head


__all__ = ["calibration_verdict", "recorded_verdict", "verdict"]
