"""Augmentation: the views a method compares, with one ``strength`` knob.

:mod:`.recipes` holds the recipes and the per-sample reference path (torchvision v2), :mod:`.batched` the
same recipes on a uint8 batch on the training device, :mod:`.preview` a PNG of the views a run would train on.
"""
