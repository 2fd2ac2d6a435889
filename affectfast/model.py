"""The model: a torchvision ResNet-18 trunk and one small linear head per trained task (docs/design.md §4).

Initialization is one string, parsed by :func:`parse_init`:
- ``scratch``: torchvision's default random init;
- ``imagenet``: torchvision's ImageNet weights from its local cache (``torch.hub.get_dir()/checkpoints``);
- ``imagenet:PATH``: the same weights from a file (GPU nodes often have no network);
- ``ckpt:PATH``: the trunk of another affectfast run (uni-task pre-training, then multi-task).
Nothing here ever downloads.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18

from affectfast.config import parse_init
from affectfast.errors import DataError
from affectfast.tasks import NUM_AU, NUM_EXPR, TASKS

# Output width of each task's head: VA two regressions, EXPR 8 logits, AU 12 logits.
HEAD_SIZE: dict[str, int] = {"va": 2, "expr": NUM_EXPR, "au": NUM_AU}
# The file torchvision's ResNet18_Weights.IMAGENET1K_V1 downloads to (name includes its hash prefix).
IMAGENET_FILE = "resnet18-f37072fd.pth"
IMAGENET_URL = "https://download.pytorch.org/models/" + IMAGENET_FILE
TRUNK_FEATURES = 512  # ResNet-18's pooled feature width


def imagenet_cache_path() -> Path:
    """Where torchvision keeps ResNet-18's ImageNet weights once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE


class AffectNet(nn.Module):
    """ResNet-18 trunk (fc removed) and a linear head per task; ``forward`` returns a dict of raw outputs.

    Outputs are unbounded: VA regressions (the loss and the metrics see them as is, so CCC can
    rescale freely), EXPR logits, AU logits (sigmoid > 0.5 means active).
    """

    def __init__(self, tasks: tuple[str, ...]):
        super().__init__()
        self.tasks = tuple(tasks)
        self.trunk = resnet18(weights=None)
        self.trunk.fc = nn.Identity()
        self.heads = nn.ModuleDict({t: nn.Linear(TRUNK_FEATURES, HEAD_SIZE[t]) for t in self.tasks})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(images)
        return {task: head(features) for task, head in self.heads.items()}


def load_weights_file(path: Path, what: str) -> dict:
    """A dict torch.save wrote (tensors and plain values only: nothing is unpickled); anything
    else is a one-line DataError saying what the file is not, without torch's advice to load
    untrusted files with weights_only=False."""
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise DataError(path, f"cannot read {what}: {error.strerror or error}") from None
    except pickle.UnpicklingError:  # objects other than tensors, or bytes that are no pickle
        state = None
    except Exception as error:  # a truncated download, an HTML page saved as .pth, ...
        damaged = "zip archive" in str(error)
        reason = "a damaged torch.save file (truncated or modified)" if damaged else None
        raise DataError(path, f"cannot read {what}: {reason or 'not a torch.save file'}") from None
    if not isinstance(state, dict):
        raise DataError(path, f"cannot read {what}: not a dict of tensors saved with torch.save")
    return state


def load_imagenet_trunk(model: AffectNet, path: Path | None) -> None:
    """Load torchvision's ResNet-18 ImageNet weights (minus the 1000-class fc) into the trunk."""
    path = path or imagenet_cache_path()
    if not path.is_file():
        raise DataError(
            path,
            (
                f"ImageNet weights for ResNet-18 not found (affectfast never downloads). Fetch {IMAGENET_URL} "
                f"on a machine with network and put it at {imagenet_cache_path()}, or pass --init imagenet:PATH"
            ),
        )
    state = load_weights_file(path, "ImageNet weights")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        model.trunk.load_state_dict(state)
    except RuntimeError as error:  # missing/unexpected keys or wrong shapes
        raise DataError(
            path, f"not a ResNet-18 state_dict: {str(error).splitlines()[1].strip()}"
        ) from error


def load_checkpoint_trunk(model: AffectNet, path: Path) -> None:
    """Load the trunk of another affectfast run's checkpoint; its heads are ignored."""
    checkpoint = load_weights_file(path, "checkpoint")
    if checkpoint.get("stage") == "temporal":
        raise DataError(
            path,
            "a temporal checkpoint has no ResNet trunk (affectfast train-temporal trains a "
            "sequence head over features): give --init ckpt: a frame run's checkpoint "
            "(affectfast train)",
        )
    if not isinstance(checkpoint.get("model"), dict):
        raise DataError(path, "not an affectfast checkpoint (no 'model' entry)")
    prefix = "trunk."
    state = {k[len(prefix) :]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)}
    try:
        model.trunk.load_state_dict(state)
    except RuntimeError as error:
        raise DataError(
            path, f"checkpoint trunk is not a ResNet-18: {str(error).splitlines()[1].strip()}"
        ) from error


def build_model(tasks: tuple[str, ...], init: str = "scratch") -> AffectNet:
    """An :class:`AffectNet` for ``tasks`` with its trunk initialized as ``init`` says (on the CPU)."""
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}; got {tasks}")
    kind, path = parse_init(init)
    model = AffectNet(tasks)
    if kind == "imagenet":
        load_imagenet_trunk(model, path)
    elif kind == "ckpt":
        load_checkpoint_trunk(model, path)
    return model
