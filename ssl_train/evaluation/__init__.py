"""Evaluation of a frozen backbone: the weighted kNN monitor, the linear probe, and the label-free scores."""
