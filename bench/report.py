"""Shared by the benchmarks: write one section of BENCHMARKS.md, describe the machine."""
from __future__ import annotations

import platform
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(text: str, path: Path = BENCHMARKS) -> None:
    """Replace the section that `text` starts with ("## Title", up to the next "## ") or append it."""
    heading = text.splitlines()[0]
    text = text.rstrip("\n") + "\n\n"  # a blank line before whatever section follows
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(lambda _: text, doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc.rstrip("\n") + "\n")


def cpu_model() -> str:
    match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return match.group(1).strip() if match else platform.processor() or "unknown"
