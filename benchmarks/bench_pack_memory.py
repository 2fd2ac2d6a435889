"""Python-heap memory of reading a tree and packing it (tracemalloc), to extrapolate to 2.8M frames.

ru_maxrss mixes in shared libraries and allocator slack; tracemalloc counts what affectfast itself
holds: the reader's arrays, the sample index, and the transient peak of a whole pack (main process).

    .venv/bin/python benchmarks/bench_pack_memory.py /tmp/affectfast-bench/tree-v100-f1000-s112
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import tracemalloc
from pathlib import Path

from affectfast.affwild2 import find_annotation_dirs, read_tree
from affectfast.pack import PackConfig, build_index, pack

AFFWILD2_FRAMES = 2_800_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "root", type=Path, help="an Aff-Wild2-layout tree (e.g. from affectfast synth)"
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    tracemalloc.start()
    dirs = find_annotation_dirs(args.root)
    index = build_index(read_tree(dirs), dirs.frames)
    frames = len(index)
    held, _ = tracemalloc.get_traced_memory()
    del index
    tracemalloc.reset_peak()
    with tempfile.TemporaryDirectory() as out:
        pack(PackConfig(root=args.root, out=Path(out), workers=args.workers), progress=False)
    _, peak = tracemalloc.get_traced_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"frames {frames}: reader+index hold {held / 2**20:.1f} MiB ({held / frames:.0f} B/frame); "
        f"whole pack peak {peak / 2**20:.1f} MiB ({peak / frames:.0f} B/frame); main ru_maxrss {rss:.0f} MiB"
    )
    print(
        f"extrapolated to {AFFWILD2_FRAMES / 1e6:.1f}M frames: index {held / frames * AFFWILD2_FRAMES / 2**30:.2f} GiB, "
        f"pack peak {peak / frames * AFFWILD2_FRAMES / 2**30:.2f} GiB (Python heap of the main process)"
    )


if __name__ == "__main__":
    main()
