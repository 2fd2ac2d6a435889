"""The report: ``report.json`` (everything), ``report.md`` (the table, then each check), and the
summary the CLI prints."""

from __future__ import annotations

import json
from pathlib import Path

from affectfast.doctor.check import FAILED, NOT_RUN, PASSED, STATUSES, Check


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
    return "\n".join([*lines, f"report: {out / 'report.md'} and {out / 'report.json'}"])


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
