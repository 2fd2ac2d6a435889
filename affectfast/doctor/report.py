"""The report: ``report.json`` (everything), ``report.md`` (the table, then each check), the
summary the CLI prints, and the record that marks REPORT_DIR as doctor's.

REPORT_DIR must be missing, empty, or an earlier doctor report: one that holds doctor's record
(:data:`RECORD`, validated, never read through a link) and nothing the record does not list. A
folder of the user's files, even one with a ``report.md``, is refused before any work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from affectfast.doctor.check import FAILED, NOT_RUN, PASSED, STATUSES, Check
from affectfast.doctor.plan import WORK
from affectfast.errors import DataError, check_writable_folder
from affectfast.safe_files import excerpt, read_text

RECORD = ".affectfast-doctor.json"  # hidden: what wrote REPORT_DIR and what it may hold
RECORD_TOOL, RECORD_FORMAT = "affectfast doctor", 1
RECORD_LIMIT = 64 * 1024  # bytes; doctor's record is a few hundred
# Everything doctor writes into REPORT_DIR (WORK is a folder: the synthesized packs, torchrun runs).
REPORT_ENTRIES = ("report.md", "report.json", "nvidia-smi.txt", "trace_train_steps.json", WORK)


def check_report_folder(out: Path) -> None:
    """Before any work: ``out`` is missing, empty, or an earlier doctor report (a valid record, and
    nothing in it the record does not list); else a DataError naming what is in the way."""
    if out.exists() and not out.is_dir():
        raise DataError(out, "--out exists and is not a folder")
    check_writable_folder(out)
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not entries:
        return
    if RECORD not in entries:
        raise DataError(
            out,
            f"--out is not empty and not an earlier doctor report (no {RECORD}): it holds "
            f"{excerpt(entries)}; doctor writes {', '.join(REPORT_ENTRIES)} there, so choose a "
            "new or empty folder",
        )
    listed = read_record(out / RECORD)
    foreign = [name for name in entries if name != RECORD and name not in listed]
    if foreign:
        raise DataError(
            out,
            f"an earlier doctor report, but it also holds {excerpt(foreign)}, which doctor does "
            "not write; move them out, or choose a new or empty --out",
        )


def read_record(path: Path) -> list[str]:
    """The names an earlier doctor run's record lists; a DataError if ``path`` is not such a
    record (not a regular file, not JSON, another tool or format, names doctor never writes)."""
    text = read_text(path, limit=RECORD_LIMIT, follow_links=False, what="doctor record")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(path, f"is not doctor's record: not JSON ({error.msg})") from None
    files = record.get("files") if isinstance(record, dict) else None
    valid = (
        isinstance(record, dict)
        and record.get("tool") == RECORD_TOOL
        and record.get("format") == RECORD_FORMAT
        and isinstance(files, list)
        and all(isinstance(name, str) and name in REPORT_ENTRIES for name in files)
    )
    if not valid:
        raise DataError(
            path,
            f"is not a record doctor wrote (expected tool {RECORD_TOOL!r}, format "
            f"{RECORD_FORMAT}, files among {', '.join(REPORT_ENTRIES)}; got {excerpt(record)}): "
            "--out is not an earlier doctor report, choose a new or empty folder",
        )
    return files


def claim_report_folder(out: Path) -> None:
    """Create ``out`` and write doctor's record into it, before anything else is written there."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"tool": RECORD_TOOL, "format": RECORD_FORMAT, "files": list(REPORT_ENTRIES)}
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(out / RECORD, flags, 0o644)
    with os.fdopen(fd, "w") as file:
        file.write(json.dumps(record, indent=1) + "\n")


def write_report(checks: list[Check], meta: dict, out: Path) -> None:
    """``out/report.json`` (everything) and ``out/report.md`` (the table, then each check)."""
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    report = {**meta, "counts": counts, "checks": [c.to_dict() for c in checks]}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    source = (
        f"`{meta['shards']}` (given)"
        if meta["shards_given"]
        else f"`{meta['shards']}` (synthesized by doctor)"
    )
    lines = [
        "# affectfast doctor report",
        "",
        f"- started {meta['started']}, took {meta['seconds']:.0f} s; device `{meta['device']}`"
        + (" (--quick)" if meta["quick"] else ""),
        f"- shards: {source}; whole epochs run on synthesized packs: the epochs check on "
        f"`{meta['epochs_pack']}`, the torchrun checks on `{meta['ddp_pack']}`",
        f"- {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[NOT_RUN]} not run",
        *(f"- decode settings measured best here: `{c}`" for c in [train_command(checks)] if c),
        "",
        "passed: ran and met its criterion (a measurement: it completed); failed: ran and missed "
        "it, or raised; not run: could not run here (the reason is given). A check that needs "
        "CUDA is never reported as passed without it.",
        "",
        "| # | check | status | result |",
        "|---|---|---|---|",
    ]
    for check in checks:
        status = f"**{check.status}**" if check.status == FAILED else check.status
        lines.append(f"| {check.number} | {check.title} | {status} | {_md(check.summary)} |")
    for check in checks:
        lines += ["", f"## {check.number}. {check.title}: {check.status}", ""]
        if check.criterion:
            lines.append(f"Criterion: {check.criterion}.")
            lines.append("")
        lines.append(_md(check.summary))
        if check.body:
            lines += ["", *check.body]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def format_summary(checks: list[Check], out: Path) -> str:
    """What the CLI prints: one line per check, then where the report is."""
    width = max(len(c.title) for c in checks)
    lines = [f"{c.number:<3} {c.status:<8} {c.title:<{width}}  {c.summary}" for c in checks]
    if command := train_command(checks):
        lines.append(f"decode settings measured best here: {command}")
    return "\n".join([*lines, f"report: {out / 'report.md'} and {out / 'report.json'}"])


def train_command(checks: list[Check]) -> str | None:
    """The decode check's ``affectfast train`` line, where it made one (on the GPU)."""
    decode = next((c for c in checks if c.key == "decode"), None)
    choice = decode.details.get("recommendation") if decode is not None else None
    return choice["command"] if choice else None


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
