"""CPU training images/s with the cores to itself and with one competing busy process, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_contention.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_contention.py --repeats 3 --windows 7

The training is `affectfast train`'s own step and loader (``build_run``): dali-cpu, 64 px, batch 64,
all three tasks, augmentation on, amp off, on a small synthetic pack this script makes first. Each
configuration runs in a fresh process (libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads), once
with the machine as it is ("idle") and once beside a ``python -c "while True: pass"`` child
("busy"); the two loads alternate, ``--repeats`` times, so slow drift of the machine hits both.
A measurement is the median images/s of ``--windows`` windows of ``--steps`` steps after
``--warmup`` steps. Configurations:

- ``fixed``: the settings before thread budgets: torch's default intra-op threads (one per core),
  2 DALI threads, libgomp's default wait policy (threads spin a while before sleeping);
- ``passive``: the same threads, ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep at once);
- ``auto``: what ``affectfast train`` does now: ``OMP_WAIT_POLICY=PASSIVE`` as the CLI sets it
  (``cli.use_passive_openmp``), ``num_threads="auto"`` and torch's threads from
  ``affectfast.dist.cpu_budget`` (``train.loader_threads``, ``train.set_torch_threads``).

Prints per configuration the median images/s idle and busy, and kept = busy / idle (sharing one of
two cores fairly keeps about 50%); writes the table as CSV (``--csv``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

CONFIGS = ("fixed", "passive", "auto")
BUSY = "while True: pass"


def measure(args) -> None:
    """Child process: time training windows in one configuration; print one JSON line."""
    if args.config in ("passive", "auto"):
        from affectfast.cli import use_passive_openmp

        use_passive_openmp()  # before torch loads, as the CLI does
    import torch

    from affectfast.config import TrainConfig
    from affectfast.dist import DistInfo
    from affectfast.train import build_run, resolve_device, set_torch_threads

    config, _ = resolve_device(
        TrainConfig(
            shards=args.shards,
            out=Path(tempfile.gettempdir()) / "unused",
            loader="dali-cpu",
            batch_size=64,
            image_size=64,
            amp="off",
            num_threads="auto" if args.config == "auto" else 2,
        )
    )
    info = DistInfo()
    if args.config == "auto":
        set_torch_threads(info)
    run = build_run(config, info)

    def batches():
        epoch = 0
        while True:
            run.train_loader.set_epoch(epoch)
            yield from run.train_loader
            epoch += 1

    stream = batches()
    for batch in islice(stream, args.warmup):
        run.step(run.model, batch)
    rates = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for batch in islice(stream, args.steps):
            run.step(run.model, batch)
        rates.append(args.steps * config.batch_size / (time.perf_counter() - start))
    loader = run.train_loader.config.num_threads
    print(
        json.dumps(
            {
                "rates": rates,
                "torch_threads": torch.get_num_threads(),
                "loader_threads": loader,
                "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            }
        )
    )


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(args, config: str, busy: bool) -> dict:
    """One configuration in a fresh process, beside a busy loop when ``busy``.

    Also returns ``others``: the CPUs that processes other than this benchmark's kept busy during
    the run, on average (the machine's busy time less this script's children's CPU time).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    machine, mine, start = busy_seconds(), _children_cpu(), time.perf_counter()
    competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                config,
                "--shards",
                str(args.shards),
                "--windows",
                str(args.windows),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    others = (busy_seconds() - machine - (_children_cpu() - mine)) / (time.perf_counter() - start)
    if result.returncode != 0:
        sys.exit(f"{config} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "others": max(0.0, others)}


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def make_pack(folder: Path) -> Path:
    """A small synthetic pack (64 px frames) for the timing runs."""
    from affectfast.pack import PackConfig, pack
    from affectfast.synth import SynthConfig, synthesize

    tree = synthesize(
        SynthConfig(out=folder / "tree", videos=12, frames=100, seed=0, image_size=64, workers=1)
    )
    pack(PackConfig(root=tree, out=folder / "shards", workers=1, shard_size=250, seed=0))
    return folder / "shards"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=CONFIGS, dest="config", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help="a pack to train on; default: make one")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS)
    )
    parser.add_argument("--repeats", type=int, default=2, help="idle/busy pairs per configuration")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per measurement")
    parser.add_argument("--steps", type=int, default=6, help="training steps per window")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--csv", type=Path, default=Path("runs/bench_contention.csv"))
    args = parser.parse_args(argv)
    if args.config:
        measure(args)
        return

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            args.shards = make_pack(Path(tmp))
        found: dict[tuple[str, str], list[float]] = {}
        settings: dict[str, dict] = {}
        others: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            for config in configs:
                for load in ("idle", "busy"):
                    result = run_child(args, config, load == "busy")
                    found.setdefault((config, load), []).extend(result["rates"])
                    others.setdefault(config, []).append(result["others"])
                    settings[config] = {
                        k: v for k, v in result.items() if k not in ("rates", "others")
                    }
                    median = statistics.median(result["rates"])
                    print(
                        f"[{repeat + 1}/{args.repeats}] {config:<7} {load:<5} {median:7.1f} "
                        f"images/s  windows {' '.join(f'{r:.0f}' for r in result['rates'])}  "
                        f"(other processes: {result['others']:.2f} CPUs)",
                        file=sys.stderr,
                    )
    rows = []
    for config in configs:
        idle = statistics.median(found[config, "idle"])
        busy = statistics.median(found[config, "busy"])
        rows.append(
            {
                "config": config,
                **settings[config],
                "idle_images_per_s": round(idle, 1),
                "busy_images_per_s": round(busy, 1),
                "kept": round(busy / idle, 3),
                "others_cpus": " ".join(f"{x:.2f}" for x in others[config]),
                "idle_windows": " ".join(f"{r:.0f}" for r in found[config, "idle"]),
                "busy_windows": " ".join(f"{r:.0f}" for r in found[config, "busy"]),
            }
        )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"{'config':<8}{'torch thr':>10}{'loader thr':>11}{'wait policy':>13}"
        f"{'idle img/s':>12}{'busy img/s':>12}{'kept':>7}"
    )
    for row in rows:
        print(
            f"{row['config']:<8}{row['torch_threads']:>10}{row['loader_threads']:>11}"
            f"{row['wait_policy']:>13}{row['idle_images_per_s']:>12.1f}"
            f"{row['busy_images_per_s']:>12.1f}{row['kept']:>7.0%}"
        )
    print(
        f"dali-cpu, 64 px, batch 64, {os.cpu_count()} CPUs; medians of "
        f"{args.repeats} x {args.windows} windows of {args.steps} steps; csv: {args.csv}"
    )
    print(
        "CPUs kept busy by other processes during each run (noise): "
        + "; ".join(f"{row['config']} {row['others_cpus']}" for row in rows)
    )


if __name__ == "__main__":
    main()
