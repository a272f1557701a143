"""What both benchmarks write: the machine they ran on and their BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def machine_info(results: list[dict[str, Any]], load_avg: tuple[float, float, float]) -> str:
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    ram_gib = float("nan")
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), cpu)
        meminfo = Path("/proc/meminfo").read_text()
        ram_gib = int(next(ln for ln in meminfo.splitlines() if ln.startswith("MemTotal:")).split()[1]) / 2**20
    except (OSError, StopIteration):
        pass
    threads = sorted({r["threads"] for r in results if "threads" in r})
    load = " / ".join(f"{x:.1f}" for x in load_avg)
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram_gib:.0f} GiB RAM, load average (1/5/15 min) at start {load}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"torch threads {'/'.join(map(str, threads)) or '?'}"
    )


def section_lines(heading: str, command: str, date: str, machine: str, description: str, table: str) -> list[str]:
    """The opening of a BENCHMARKS.md section: what ran, when, where, on what, and the table."""
    return [
        heading,
        "",
        f"Command: `{command}`",
        "",
        f"Date: {date}",
        "",
        f"Machine: {machine}",
        "",
        description,
        "",
        table,
        "",
    ]


def record_section(
    output: str,
    heading: str,
    command: str,
    argv: list[str],
    load_avg: tuple[float, float, float],
    workload: str,
    table: str,
) -> None:
    """Write a one-process benchmark's section (``rtp-mm bench --structured/--lora/--speculative``) to ``output``."""
    import datetime
    import shlex

    import torch

    command += f" {shlex.join(argv)}" if argv else ""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_info([{"threads": torch.get_num_threads()}], load_avg)
    write_section(Path(output), "\n".join(section_lines(heading, command, date, machine, workload, table)), heading)


def write_section(path: Path, section: str, heading: str) -> None:
    text = path.read_text() if path.exists() else ""
    path.write_text(replace_section(text, heading, section))


def replace_section(text: str, heading: str, section: str) -> str:
    """Replace the ``heading`` section (up to the next heading of level 1 or 2) or append it."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    block = section.rstrip("\n") + "\n"
    if start is None:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + block
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + tail if tail else "")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
