"""The README's quick-start commands are the ones CI runs, the main job is the installed benchmark, and the
API snippet runs as pasted on a CPU machine."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start() -> list[str]:
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", README, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_quick_start_is_complete():
    lines = _quick_start()
    assert lines[0].startswith("git clone ") and "&& cd fused_lora" in lines[0]
    assert lines[1] == "python3 -m venv .venv && . .venv/bin/activate"
    assert lines[2:] == ['pip install torch==2.13.0', 'pip install -e ".[dev]"', "fused-lora-bench",
                         'pytest -m "not gpu"']


def test_ci_runs_the_readme_commands():
    _, _, torch_install, install, _, test = _quick_start()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert f"pip install --quiet {torch_install.split(' ', 2)[2]}" in ci
    assert install in ci and test in ci


def test_main_job_is_the_declared_console_script():
    main_job = _quick_start()[4]
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib: requires-python is >= 3.10
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", pyproject, re.S | re.M).group(1)
    assert main_job == "fused-lora-bench"
    assert re.search(r'^fused-lora-bench = "fused_lora\.benchmarks\.cli:main"$', scripts, re.M)


def test_api_snippet_runs_as_pasted():
    snippet = re.search(r"## API\s+```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md (API)", "exec"), namespace)
    assert namespace["y"].shape == (2, 8, 32) and namespace["y_ref"].shape == (2, 8, 32)
    assert namespace["lora_A"].grad is not None
