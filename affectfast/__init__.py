"""affectfast: train facial-affect models on the whole of Aff-Wild2, fast.

The public API: ``from affectfast import build_loader, Batch, TrainConfig`` ... Names load their
module on first use, so ``import affectfast`` stays cheap (no torch or DALI until needed).

The stage functions ``pack``, ``verify``, ``train`` and ``predict`` share their module's name, and
a package attribute cannot be both (``import affectfast.pack`` would rebind it): import them from
their modules, ``from affectfast.pack import pack``, ``from affectfast.train import train``.
"""

from __future__ import annotations

import importlib

# name -> module that defines it
_API = {
    "DataError": "affectfast.errors",
    "TASKS": "affectfast.tasks",
    "AnnotationDirs": "affectfast.affwild2",
    "VideoLabels": "affectfast.affwild2",
    "find_annotation_dirs": "affectfast.affwild2",
    "read_tree": "affectfast.affwild2",
    "SynthConfig": "affectfast.synth",
    "synthesize": "affectfast.synth",
    "PackConfig": "affectfast.pack",
    "load_manifest": "affectfast.shards",
    "AugmentSpec": "affectfast.config",
    "TrainConfig": "affectfast.config",
    "EvalConfig": "affectfast.config",
    "Batch": "affectfast.batch",
    "build_loader": "affectfast.loaders",
    "LOADER_KINDS": "affectfast.constants",
    "build_model": "affectfast.model",
    "evaluate": "affectfast.predict",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'affectfast' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return __all__
