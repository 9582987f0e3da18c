"""Stage 4, calibration: fitting on cached features, backbones frozen.

- `fitting`: cross-validation and the choice between the candidate combinations (a new candidate goes here);
- `calibrate`: `calibrate()` and its report, from labelled images to a calibrated model;
- `cascade_fitting`: fitting the cascade's stopping rule on calibration's out-of-fold answers;
- `selection`: choosing backbone subsets under a compute budget;
- `baselines`: what a user would pick instead (stacking, linear probe, Tip-Adapter).
"""
