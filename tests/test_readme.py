"""The README's quick-start commands are the ones CI runs, and the main job is the installed benchmark."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start():
    readme = (ROOT / "README.md").read_text()
    return re.search(r"## Quick start\s+```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()


def test_ci_runs_the_readme_commands():
    install, _, test = _quick_start()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def test_main_job_is_the_declared_console_script():
    _, main_job, _ = _quick_start()
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib: requires-python is >= 3.10
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", pyproject, re.S | re.M).group(1)
    assert main_job == "fused-lora-bench"
    assert re.search(r'^fused-lora-bench = "fused_lora\.benchmarks\.cli:main"$', scripts, re.M)
