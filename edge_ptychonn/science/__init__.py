"""Offline science: the PtychoNN model and its export, the scan simulator,
stitching, accuracy metrics, training and evaluation."""
