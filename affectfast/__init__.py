"""affectfast: train facial-affect models on the whole of Aff-Wild2, fast."""

from affectfast.errors import DataError
from affectfast.tasks import TASKS

__all__ = ["DataError", "TASKS"]
