"""Install affectfast with DALI on a GPU node that has no package index: a wheelhouse in parts.

Where a package registry is reachable (a login node, a laptop), ``build`` downloads every wheel
affectfast needs for the node's Python and platform, except what the node already has (its
``pip freeze``), and lays them out in parts of at most ``--part-mib`` MiB each (DALI's wheel alone
is ~424 MB, larger than some transfer limits: big wheels are cut into chunks across parts). Move
the parts to the node by any means, then ``join`` them there (standard library only, so it runs
before anything is installed): every chunk is checked, every wheel re-assembled and its sha256
compared with the one recorded at download. Then ``pip install --no-index``.

    # on the node: what it has
    python3 -m pip freeze > node-freeze.txt
    # where PyPI is reachable
    python3 tools/wheelhouse.py build --python-version 3.12 --have node-freeze.txt --out wheelhouse
    # on the node, with wheelhouse/part-*/ copied over
    python3 tools/wheelhouse.py join wheelhouse --out wheelhouse/wheels
    python3 -m venv --system-site-packages .venv        # keeps the node's own torch/torchvision
    .venv/bin/pip install --no-index --find-links wheelhouse/wheels -e .

The README's "Offline GPU nodes" section has the whole procedure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

RECORD = "wheelhouse.json"  # in every part: which chunks of which wheels each part holds
FORMAT = 1
# What affectfast needs beyond torch/torchvision (pyproject.toml's dependencies), plus the build
# backend an editable install needs under --no-index.
REQUIREMENTS = (
    "nvidia-dali-cuda120",
    "webdataset",
    "click",
    "tqdm",
    "scikit-learn",
    "tensorboard",
    "matplotlib",
    "numpy",
    "pillow",
    "setuptools>=68",
    "wheel",
)
# manylinux tags a current x86_64 node accepts (pip picks the best each wheel offers).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CHUNK = 1 << 20


def project_name(text: str) -> str:
    """A distribution's normalized name (PEP 503): ``Nvidia_DALI.cuda120`` -> ``nvidia-dali-cuda120``."""
    return re.sub(r"[-_.]+", "-", text).lower()


def installed_projects(freeze: Path) -> set[str]:
    """Projects a ``pip freeze`` lists (``name==version`` or ``name @ url`` lines)."""
    names = set()
    for line in freeze.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(==|@)", line)
        if match:
            names.add(project_name(match.group(1)))
    return names


def wheel_project(path: Path) -> str:
    """The project a wheel file installs (its file name's first field)."""
    return project_name(path.name.split("-")[0])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(python_version: str, requirements: list[str], into: Path) -> None:
    """``pip download`` binary wheels for the target interpreter and platform into ``into``."""
    command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(into)]
    command += ["--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + requirements, check=True)


def plan_parts(wheels: list[Path], part_bytes: int) -> list[list[dict]]:
    """Assign each wheel's bytes to parts of at most ``part_bytes``: a list of parts, each a list
    of pieces ``{"wheel", "chunk", "offset", "size"}`` in order (big wheels span several parts)."""
    parts: list[list[dict]] = [[]]
    room = part_bytes
    for wheel in sorted(wheels, key=lambda p: p.name):
        size, offset, chunk = wheel.stat().st_size, 0, 0
        while offset < size:
            if room == 0:
                parts.append([])
                room = part_bytes
            take = min(room, size - offset)
            parts[-1].append({"wheel": wheel.name, "chunk": chunk, "offset": offset, "size": take})
            offset, chunk, room = offset + take, chunk + 1, room - take
    return [part for part in parts if part]


def write_parts(wheels: list[Path], out: Path, part_bytes: int) -> list[Path]:
    """Lay ``wheels`` out as ``out/part-NN/`` folders of at most ``part_bytes`` (plus a small
    record in each); returns the part folders."""
    parts = plan_parts(wheels, part_bytes)
    wheel_info = {w.name: {"size": w.stat().st_size, "sha256": sha256(w)} for w in wheels}
    chunks = {}
    for number, part in enumerate(parts):
        for piece in part:
            chunks.setdefault(piece["wheel"], []).append(
                {"part": number, "chunk": piece["chunk"], "size": piece["size"]}
            )
    record = {"format": FORMAT, "parts": len(parts), "wheels": wheel_info, "chunks": chunks}
    folders = []
    source = {w.name: w for w in wheels}
    for number, part in enumerate(parts):
        folder = out / f"part-{number:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for piece in part:
            with open(source[piece["wheel"]], "rb") as src:
                src.seek(piece["offset"])
                data = src.read(piece["size"])
            (folder / chunk_name(piece["wheel"], piece["chunk"])).write_bytes(data)
        (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        folders.append(folder)
    return folders


def chunk_name(wheel: str, chunk: int) -> str:
    return f"{wheel}.chunk{chunk:03d}"


def join(parts_root: Path, out: Path) -> list[Path]:
    """Re-assemble every wheel from the ``part-NN`` folders under ``parts_root`` into ``out``,
    checking each wheel's size and sha256; a missing part or chunk is named, nothing half-written."""
    folders = sorted(p for p in parts_root.glob("part-*") if p.is_dir())
    if not folders:
        raise SystemExit(f"error: {parts_root}: no part-NN folders (copy every part first)")
    record = json.loads((folders[0] / RECORD).read_text())
    if record.get("format") != FORMAT:
        raise SystemExit(f"error: {folders[0] / RECORD}: not a wheelhouse record this tool reads")
    present = {p.name for p in folders}
    missing = [f"part-{n:02d}" for n in range(record["parts"]) if f"part-{n:02d}" not in present]
    if missing:
        raise SystemExit(f"error: {parts_root}: missing {', '.join(missing)} of {record['parts']}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for wheel, info in sorted(record["wheels"].items()):
        target = out / wheel
        temporary = out / f".{wheel}.joining"
        with open(temporary, "wb") as dst:
            for piece in record["chunks"][wheel]:
                path = parts_root / f"part-{piece['part']:02d}" / chunk_name(wheel, piece["chunk"])
                if not path.is_file() or path.stat().st_size != piece["size"]:
                    temporary.unlink()
                    raise SystemExit(f"error: {path}: missing or of the wrong size; copy it again")
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, dst, CHUNK)
        if temporary.stat().st_size != info["size"] or sha256(temporary) != info["sha256"]:
            temporary.unlink()
            raise SystemExit(f"error: {wheel}: re-assembled bytes differ from the download")
        temporary.replace(target)
        written.append(target)
    return written


def build(args) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out}: not empty; choose a new --out")
    downloads = out / "downloads"
    downloads.mkdir(parents=True)
    download(args.python_version, list(REQUIREMENTS), downloads)
    have = installed_projects(Path(args.have)) if args.have else set()
    downloaded = sorted(downloads.glob("*.whl"))
    keep = [w for w in downloaded if wheel_project(w) not in have]
    folders = write_parts(keep, out, args.part_mib << 20)
    shutil.rmtree(downloads)
    total = sum(w["size"] for w in json.loads((folders[0] / RECORD).read_text())["wheels"].values())
    print(
        f"{out}: {len(keep)} wheels, {total / 2**20:.0f} MiB in {len(folders)} parts of at most "
        f"{args.part_mib} MiB ({len(downloaded) - len(keep)} left out: the node has them)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="download wheels and lay them out in parts")
    build_parser.add_argument("--python-version", required=True, help="the node's, e.g. 3.12")
    build_parser.add_argument("--have", help="the node's `pip freeze`: those projects are left out")
    build_parser.add_argument("--out", required=True, help="a new folder for part-NN/")
    build_parser.add_argument("--part-mib", type=int, default=60, help="MiB per part (default 60)")
    join_parser = commands.add_parser("join", help="re-assemble the wheels from the parts")
    join_parser.add_argument("parts", help="the folder holding part-NN/")
    join_parser.add_argument("--out", required=True, help="folder for the wheels")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args)
    else:
        wheels = join(Path(args.parts), Path(args.out))
        print(f"{args.out}: {len(wheels)} wheels re-assembled and checked (sha256)")


if __name__ == "__main__":
    main()
