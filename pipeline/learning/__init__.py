"""Learning: classifiers, calibration, scoring, training and the model registry."""
