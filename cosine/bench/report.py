"""Benchmark reports: environment capture, JSON and markdown output, README table update."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import re
import subprocess
import time

import torch
import transformers

README_MARKER = "<!-- bench:{name} -->"


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=pathlib.Path(__file__).resolve().parent,
            timeout=5,
        )
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=pathlib.Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    env = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_results(out_dir: pathlib.Path, name: str, payload: dict, markdown: str) -> tuple[pathlib.Path, pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    js = out_dir / f"{name}-{stamp}.json"
    md = out_dir / f"{name}-{stamp}.md"
    js.write_text(json.dumps(payload, indent=1))
    md.write_text(markdown + "\n")
    return js, md


def update_readme(readme: pathlib.Path, name: str, markdown: str) -> bool:
    """Replace the text between two ``<!-- bench:name -->`` markers; returns whether it did."""
    marker = README_MARKER.format(name=name)
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(marker) + r".*?" + re.escape(marker), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{marker}\n{markdown}\n{marker}", text), encoding="utf-8")
    return True
