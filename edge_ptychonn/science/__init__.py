"""Offline science: the PtychoNN model and its export, the scan simulator,
stitching, accuracy metrics, stitch-and-score through the engines (accuracy),
training and evaluation."""
