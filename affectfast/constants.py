"""Choice lists shared by the library and the CLI.

Pure Python (no numpy, torch or DALI) so that ``affectfast --help`` can import it at once; the
library validates against the same tuples, so a new choice is added in one place.
"""

from __future__ import annotations

LOADER_KINDS: tuple[str, ...] = ("dali-gpu", "dali-cpu", "wds", "files")
# Kinds that read packed shards (not the raw tree): what a checkpoint can be evaluated with.
SHARD_LOADER_KINDS: tuple[str, ...] = tuple(k for k in LOADER_KINDS if k != "files")
INTERPOLATIONS: tuple[str, ...] = ("nearest", "linear")
AMP_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")
DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu")
VA_LOSSES: tuple[str, ...] = ("ccc", "mse")
JPEG_CHECKS: tuple[str, ...] = ("full", "header")
# The sequence heads of train-temporal (affectfast.sequence).
SEQUENCE_MODELS: tuple[str, ...] = ("gru", "tcn", "transformer")
# Splits with labels (train and val) and the unlabelled ABAW test set (images only, packed from the
# challenge's test lists). Training reads train and val only; evaluate refuses test; predict reads any.
LABELLED_SPLITS: tuple[str, ...] = ("train", "val")
SPLITS: tuple[str, ...] = (*LABELLED_SPLITS, "test")
