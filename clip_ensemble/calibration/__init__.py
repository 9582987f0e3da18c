"""Stage 4, calibration: fitting on cached features, backbones frozen.

- `folds`: cached features, the cross-validation folds, and what calibration reads from the logits once;
- `static_fits`: the small full-batch fits (candidates' inverse temperature, static weights along a penalty path);
- `gate_training`: the gate trained by AdamW, one copy per fold side by side, its length chosen out of fold;
- `fitting`: the choice between the candidate combinations, out of fold (a new candidate goes here);
- `calibrate`: `calibrate()` and its report, from labelled images to a calibrated model;
- `cascade_fitting`: fitting the cascade's stopping rule on calibration's out-of-fold answers;
- `selection`: choosing backbone subsets under a compute budget;
- `baselines`: what a user would pick instead (stacking, linear probe, Tip-Adapter).
"""
