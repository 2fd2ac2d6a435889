"""affectfast: train facial-affect models on the whole of Aff-Wild2, fast."""

from affectfast.affwild2 import AnnotationDirs, VideoLabels, find_annotation_dirs, read_tree
from affectfast.errors import DataError
from affectfast.synth import SynthConfig, synthesize
from affectfast.tasks import TASKS

__all__ = [
    "AnnotationDirs",
    "VideoLabels",
    "find_annotation_dirs",
    "read_tree",
    "DataError",
    "SynthConfig",
    "synthesize",
    "TASKS",
]
