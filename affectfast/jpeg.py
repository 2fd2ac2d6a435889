"""JPEG checks for the shard writer: a fast structural check and a full decode.

``check_jpeg(data, "header")`` reads only the marker segments up to the frame header (SOF) and the
last bytes: it proves the file starts as a JPEG, declares sane dimensions and was not cut short (an
empty or truncated file lacks the end-of-image marker). ``check_jpeg(data, "full")`` does that and
then decodes every pixel with Pillow, which also catches damage inside the entropy-coded data.
The header check is an order of magnitude cheaper than the full decode (see benchmarks/bench_pack.py).
"""

from __future__ import annotations

import io
import struct

from PIL import Image

from affectfast.constants import JPEG_CHECKS

CHECKS = JPEG_CHECKS

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# Start-of-frame markers (baseline, extended, progressive, lossless, hierarchical, arithmetic):
# C0..CF except C4 (DHT), C8 (JPG, reserved) and CC (DAC).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field: TEM and the restart markers RST0..7.
STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])
SOS = 0xDA
# Largest side a JPEG can declare; a bigger value means a corrupt header.
MAX_SIDE = 65535


class JpegError(ValueError):
    """The bytes are not a complete, decodable JPEG; the message says what is wrong."""


def check_jpeg(data: bytes, check: str = "full") -> tuple[int, int]:
    """Check one JPEG file's bytes and return its (height, width); raise JpegError if it is bad."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    size = check_header(data)
    if check == "full":
        decode(data)
    return size


def check_header(data: bytes) -> tuple[int, int]:
    """Check SOI, the markers up to the frame header, sane dimensions and the final EOI marker."""
    if not data:
        raise JpegError("empty file")
    if not data.startswith(SOI):
        raise JpegError("no JPEG start-of-image marker (not a JPEG file)")
    # Some encoders pad after EOI; tolerate zero bytes there but nothing else.
    if not data.endswith(EOI) and not data.rstrip(b"\x00").endswith(EOI):
        raise JpegError("no end-of-image marker (truncated file)")
    return _frame_size(data)


def _frame_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments after SOI to the first SOF and return (height, width) from it."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise JpegError(f"expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == SOS or marker == EOI[1]:
            raise JpegError("scan data or end of image before any frame header (SOF)")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > end:
            raise JpegError(f"marker segment 0x{marker:02x} at byte {pos} runs past the end")
        if marker in SOF_MARKERS:
            if length < 8:
                raise JpegError(f"frame header too short ({length} bytes)")
            height, width, components = struct.unpack_from(">HHB", data, pos + 5)
            if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
                raise JpegError(f"frame header declares {width}x{height} pixels")
            if components not in (1, 3, 4):
                raise JpegError(f"frame header declares {components} colour components")
            return height, width
        pos += 2 + length
    raise JpegError("no frame header (SOF) found")


def decode(data: bytes) -> None:
    """Decode every pixel with Pillow; raise JpegError with Pillow's reason if that fails."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                raise JpegError(f"decodes as {image.format}, not JPEG")
            image.load()
    except JpegError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... on bad data
        raise JpegError(f"does not decode: {error}") from error
