"""Test-time augmentation views by name: the tensor dims each flips in an NCHW batch.

Kept apart from the engine (and torch), so that the recipe and the CLIs can check TTA names.
"""

TTA_FLIPS = {"none": (), "hflip": (3,), "vflip": (2,), "hvflip": (2, 3)}
