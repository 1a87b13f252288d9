"""The run's metadata: device, versions, git commit, date and command line."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


def git_commit(source: Path | None = None) -> tuple[str, bool | None]:
    """(HEAD of the git checkout this package runs from, whether its tracked files have changes).

    ("unknown", None) unless ``source`` (the package's __init__.py by default) is tracked by the enclosing
    checkout: a wheel installed into a venv that sits inside some other repository must not report that
    repository's commit. The current directory plays no part.
    """
    # __init__.py rather than this file: a module added since the last commit is untracked, the
    # package's __init__.py never is.
    source = Path(__file__).with_name("__init__.py").resolve() if source is None else Path(source).resolve()

    def git(*args):
        return subprocess.run(["git", *args], cwd=source.parent, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", source.name)
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") != ""
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, dirty


def run_metadata(device, mode: str, argv: list[str]) -> dict:
    import torch

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    commit, dirty = git_commit()
    return {
        "mode": mode,
        "device": device_name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "fused_lora": _version("fused_lora"),
        "git_commit": commit,
        "git_dirty": dirty,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "command": " ".join(["fused-lora-bench"] + argv),
        "triton_interpret_env": os.environ.get("TRITON_INTERPRET", ""),
    }
