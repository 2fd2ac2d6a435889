"""Sequence heads over per-frame features: timelines, windows, models and per-row prediction.

The learning layer of the temporal stage (docs/temporal.md); ``train_temporal.py`` runs it.

- A video's *timeline* is every frame 1..L, L = max(N, the last frame with an image). A frame
  without an image takes the features of the nearest frame that has one (the earlier on a tie)
  and a ``missing`` flag of 1; its labels are masked (only frames with an image carry labels).
- *Windows* of ``window`` frames start every ``stride`` frames of a video's timeline and never
  cross into the next video; the last one ends at the video's last frame. A video shorter than the
  window is one window, padded at the end: padding is masked out of the loss and the outputs, and
  reads as missing (flag 1, zero features). A window longer than every video therefore just pads
  (nothing is refused).
- Models (:class:`SequenceNet`): standardize the features (per-dim train mean/std, buffers of the
  model, so a checkpoint carries them), project [features, missing] to ``hidden``, encode with a
  bidirectional GRU, a non-causal dilated TCN or a small Transformer encoder, and give one linear
  head per task with the frame model's output kinds (VA values, EXPR logits, AU logits).
- :func:`predict_rows` runs every window of a split and averages overlapping windows per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from affectfast.constants import SEQUENCE_MODELS
from affectfast.errors import DataError
from affectfast.features import FeatureSplit, split_dir
from affectfast.model import HEAD_SIZE
from affectfast.safe_files import excerpt

TCN_DILATIONS = (1, 2, 4, 8, 16, 32)  # kernel 3: a receptive field of 253 frames
TRANSFORMER_LAYERS = 4
TRANSFORMER_HEADS = 4
STATS_CHUNK = 1 << 15  # rows per chunk when computing the standardization (128 MB as float64)


# --- timelines and windows ------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """The dense frame timeline of a whole split, videos one after another.

    ``source[i]``: the feature row frame i reads (its own, or the nearest frame's with an image);
    ``row[i]``: its own row, -1 where the frame has no image; ``missing = row < 0``.
    ``starts[v]`` and ``lengths[v]``: where video v's frames 1..L lie in these arrays.
    """

    source: np.ndarray  # (T,) int64
    row: np.ndarray  # (T,) int64
    starts: np.ndarray  # (V,) int64
    lengths: np.ndarray  # (V,) int64

    @property
    def missing(self) -> np.ndarray:
        return self.row < 0


def video_timeline(frames: np.ndarray, first_row: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, row) over frames 1..L of one video whose rows ``first_row..`` hold ``frames``
    (ascending frame numbers), L = max(``count``, the last frame)."""
    frames = np.asarray(frames, dtype=np.int64)
    length = max(int(count), int(frames[-1]))
    timeline = np.arange(1, length + 1)
    after = np.searchsorted(frames, timeline).clip(max=len(frames) - 1)  # first frame >= t
    before = (after - 1).clip(min=0)
    # The nearer of the neighbours with an image; the earlier one on a tie.
    take_after = np.abs(frames[after] - timeline) < np.abs(frames[before] - timeline)
    nearest = np.where(take_after, after, before)
    row = np.full(length, -1, dtype=np.int64)
    row[frames - 1] = first_row + np.arange(len(frames))
    return first_row + nearest, row


def build_timeline(split: FeatureSplit) -> Timeline:
    """Every video's timeline of ``split`` (see :class:`Timeline`)."""
    sources, rows, lengths = [], [], []
    for video in split.videos:
        frames = np.asarray(split.frames[video.row_slice])
        if frames[0] < 1 or (np.diff(frames) <= 0).any():
            raise DataError(
                split_dir(split.folder, split.split) / "frames.npy",
                f"video {excerpt(video.name)}: frame numbers must rise from 1 up (rows "
                f"{video.first_row}..{video.first_row + video.rows - 1}): run extract again",
            )
        source, row = video_timeline(frames, video.first_row, video.frames)
        sources.append(source)
        rows.append(row)
        lengths.append(len(row))
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)[: len(lengths)]
    empty = [np.zeros(0, np.int64)]  # a split without a video: no frame, no window
    return Timeline(np.concatenate(sources + empty), np.concatenate(rows + empty), starts, lengths)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows over a video of ``length`` frames: every ``stride`` frames,
    plus one ending at the last frame; a single window at 0 when the video is not longer than
    ``window`` (padded then)."""
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def build_windows(timeline: Timeline, window: int, stride: int) -> np.ndarray:
    """(W, 2) int64: each window's first timeline index and its video's timeline end (exclusive),
    video by video, in order."""
    out = [
        (start + offset, start + length)
        for start, length in zip(timeline.starts.tolist(), timeline.lengths.tolist())
        for offset in window_starts(length, window, stride)
    ]
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


@dataclass
class WindowBatch:
    """Windows gathered for the model: inputs on the host, then moved with :meth:`to`."""

    features: torch.Tensor  # (B, W, D) float32 (raw; the model standardizes)
    missing: torch.Tensor  # (B, W) float32: 1 where the frame has no image or is padding
    padding: torch.Tensor  # (B, W) bool: past the video's end
    rows: torch.Tensor  # (B, W) int64: the frame's own row, -1 where none (missing or padding)
    labels: dict[str, torch.Tensor]  # per task, (B, W, ...) ; meaningful where masks
    masks: dict[str, torch.Tensor]  # per task, (B, W) bool

    def to(self, device: torch.device) -> WindowBatch:
        move = lambda d: {t: v.to(device, non_blocking=True) for t, v in d.items()}  # noqa: E731
        return WindowBatch(
            self.features.to(device, non_blocking=True),
            self.missing.to(device, non_blocking=True),
            self.padding.to(device, non_blocking=True),
            self.rows.to(device, non_blocking=True),
            move(self.labels),
            move(self.masks),
        )


def gather_windows(
    split: FeatureSplit,
    timeline: Timeline,
    windows: np.ndarray,
    window: int,
    tasks: tuple[str, ...] = (),
) -> WindowBatch:
    """The features, flags, and (for ``tasks`` the split labels) labels and masks of ``windows``
    (rows of :func:`build_windows`), each ``window`` frames long."""
    index = windows[:, :1] + np.arange(window)  # (B, W) timeline indices
    padding = index >= windows[:, 1:]
    index = np.where(padding, windows[:, :1], index)  # any in-range index; masked below
    source = timeline.source[index]
    rows = np.where(padding, -1, timeline.row[index])
    # One sorted read of the memory-mapped rows, then spread out (rows repeat across overlaps).
    unique, inverse = np.unique(source, return_inverse=True)
    features = np.asarray(split.features[unique], dtype=np.float32)[inverse.reshape(source.shape)]
    features[padding] = 0.0
    missing = (rows < 0).astype(np.float32)
    labels, masks = {}, {}
    have = rows >= 0
    safe = np.where(have, rows, 0)
    for task in tasks:
        labels[task] = torch.from_numpy(np.asarray(split.labels[task][safe.ravel()])).reshape(
            *rows.shape, *split.labels[task].shape[1:]
        )
        masks[task] = torch.from_numpy(
            np.asarray(split.masks[task][safe.ravel()]).reshape(rows.shape) & have
        )
    return WindowBatch(
        torch.from_numpy(features),
        torch.from_numpy(missing),
        torch.from_numpy(padding),
        torch.from_numpy(rows),
        labels,
        masks,
    )


# --- standardization ------------------------------------------------------------------------------


def feature_stats(features: np.ndarray, chunk: int = STATS_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (float32) of (R, D) ``features``, read ``chunk`` rows at a time
    in float64 (a memory-mapped 2.9 GB split never loads whole); a constant dimension gets std 1."""
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for first in range(0, len(features), chunk):
        part = np.asarray(features[first : first + chunk], dtype=np.float64)
        total += part.sum(0)
        squares += (part * part).sum(0)
    count = max(len(features), 1)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


# --- the models -----------------------------------------------------------------------------------


class TemporalBlock(nn.Module):
    """A residual block of two non-causal dilated 1-D convolutions (kernel 3), as in a TCN."""

    def __init__(self, channels: int, dilation: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation),
        )
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, W, C)
        y = self.net(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x + y)


def sinusoidal_positions(length: int, channels: int, device) -> torch.Tensor:
    """(length, channels) fixed sine/cosine position codes (any window length at test time)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    scale = torch.exp(
        torch.arange(0, channels, 2, device=device, dtype=torch.float32)
        * (-math.log(10000.0) / channels)
    )
    codes = torch.zeros(length, channels, device=device)
    codes[:, 0::2] = torch.sin(position * scale)
    codes[:, 1::2] = torch.cos(position * scale)[:, : channels // 2]
    return codes


class SequenceNet(nn.Module):
    """[standardized features, missing flag] -> Linear -> encoder -> a linear head per task.

    ``forward(features (B, W, D), missing (B, W), padding (B, W) bool)`` returns per task
    (B, W, HEAD_SIZE[task]) raw outputs: VA values, EXPR logits, AU logits.
    """

    def __init__(
        self, kind: str, tasks: tuple[str, ...], dim: int, hidden: int = 128, dropout: float = 0.1
    ):
        super().__init__()
        if kind not in SEQUENCE_MODELS:
            raise ValueError(f"model must be one of {SEQUENCE_MODELS}; got {kind!r}")
        self.kind, self.tasks = kind, tuple(tasks)
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.embed = nn.Linear(dim + 1, hidden)
        if kind == "gru":
            self.encoder = nn.GRU(
                hidden, hidden, num_layers=2, batch_first=True, bidirectional=True, dropout=dropout
            )
            width = 2 * hidden
        elif kind == "tcn":
            self.encoder = nn.Sequential(
                *(TemporalBlock(hidden, d, dropout) for d in TCN_DILATIONS)
            )
            width = hidden
        else:
            layer = nn.TransformerEncoderLayer(
                hidden,
                TRANSFORMER_HEADS,
                dim_feedforward=2 * hidden,
                dropout=dropout,
                batch_first=True,
                norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(
                layer, TRANSFORMER_LAYERS, enable_nested_tensor=False
            )
            width = hidden
        self.dropout = nn.Dropout(dropout)
        # The heads read the encoder's output beside the frame's own embedding: what a frame
        # shows (VA here) needs no trip through the encoder, which adds only the context.
        width += hidden
        self.heads = nn.ModuleDict({t: nn.Linear(width, HEAD_SIZE[t]) for t in self.tasks})

    def set_standardization(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Set the per-dimension feature mean and std (the train split's)."""
        self.feature_mean.copy_(torch.as_tensor(mean))
        self.feature_std.copy_(torch.as_tensor(std))

    def forward(
        self, features: torch.Tensor, missing: torch.Tensor, padding: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        x = (features - self.feature_mean) / self.feature_std
        x = torch.where(padding.unsqueeze(-1), 0.0, x)
        frame = self.embed(torch.cat([x, missing.unsqueeze(-1)], dim=-1))
        if self.kind == "gru":
            x, _ = self.encoder(frame)
        elif self.kind == "tcn":
            x = self.encoder(frame)
        else:
            x = frame + sinusoidal_positions(frame.shape[1], frame.shape[2], frame.device)
            x = self.encoder(x, src_key_padding_mask=_keep_one(padding))
        x = self.dropout(torch.cat([x, frame], dim=-1))
        return {task: head(x) for task, head in self.heads.items()}


def _keep_one(padding: torch.Tensor) -> torch.Tensor:
    """The attention padding mask, never masking a whole window (attention would give NaN)."""
    padding = padding.clone()
    padding[:, 0] = False
    return padding


def build_sequence_model(
    kind: str, tasks: tuple[str, ...], dim: int, hidden: int = 128, dropout: float = 0.1
) -> SequenceNet:
    """A :class:`SequenceNet` (on the CPU, identity standardization until set)."""
    return SequenceNet(kind, tasks, dim, hidden, dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- prediction -----------------------------------------------------------------------------------


@torch.no_grad()
def predict_rows(
    model: SequenceNet,
    split: FeatureSplit,
    window: int,
    stride: int,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    progress=None,
) -> dict[str, np.ndarray]:
    """Outputs for every row (frame with an image) of ``split``, in row order: VA values, EXPR
    logits, AU probabilities (the kinds ``train.predict_split`` gives). Each frame's outputs are
    the mean over the windows that hold it (AU logits averaged, then the sigmoid).

    ``progress``: an optional wrapper of the batch iterator (a tqdm factory).
    """
    device = torch.device(device)
    model.eval()
    timeline = build_timeline(split)
    windows = build_windows(timeline, window, stride)
    rows = len(split.frames)
    sums = {t: torch.zeros(rows, HEAD_SIZE[t], device=device) for t in model.tasks}
    counts = torch.zeros(rows, device=device)
    batches = range(0, len(windows), batch_size)
    for first in progress(batches) if progress else batches:
        batch = gather_windows(split, timeline, windows[first : first + batch_size], window)
        batch = batch.to(device)
        outputs = model(batch.features, batch.missing, batch.padding)
        keep = batch.rows >= 0
        index = batch.rows[keep]
        for task, out in outputs.items():
            sums[task].index_add_(0, index, out[keep].float())
        counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
    result = {}
    for task, total in sums.items():
        mean = total / counts.clamp(min=1).unsqueeze(1)
        result[task] = (mean.sigmoid() if task == "au" else mean).cpu().numpy()
    return result
