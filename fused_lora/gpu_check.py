"""One-shot check of fused_lora on a CUDA GPU: numerics, compiled resources, timings, host overhead.

    python -m fused_lora.gpu_check --out DIR [--parts gpu_tests,kernel_report,benchmark,host]

Each part runs as a subprocess with its own timeout (on timeout its whole process group is killed), so
one hung or crashed part is recorded and the others still run:

* gpu_tests: ``pytest -m gpu`` (TRITON_INTERPRET and FUSED_LORA_BACKEND removed), read from its JUnit XML;
* kernel_report: ``python -m fused_lora.kernel_report --arch <major*10+minor> --json``: every kernel
  configuration compiled for this GPU's arch, with its spills and shared memory (runs alongside the
  tests: it only compiles, on the CPU);
* benchmark: ``fused-lora-bench`` (``python -m fused_lora.benchmarks``) with fused, eager, addmm and
  gemm at 4096x4096 and 4096x14336, 1 / 256 / 8192 tokens, r = 16, bf16, dropout 0 and 0.1;
* model_check: ``fused-lora-bench`` with fused and gemm at the points where the modeled table misses the
  fused / gemm targets (4096x1024 at 1024 and 8192 tokens, 4096x4096 at 8192 tokens, r = 64 and 16) and
  the met points beside them, bf16, dropout 0; its measured times, and the benchmark part's, are set
  against the modeled ones of the same points (the H100 or H200 preset, whichever this GPU is);
* host: ``fused-lora-bench --host-only --device cuda``: fused_lora's host time per tiny layer with
  its kernels stubbed out, against eager torch.

It writes DIR/gpu_check.json (every part's result and output, the device, torch / triton versions,
git commit, UTC date) and DIR/gpu_check.md (tables for the README's "Measured GPU results"
section), and prints the Markdown. Exit status: 0 when every part ran and passed; 1 on a numerical
failure (a gpu test failed or errored, a kernel record spilled or failed to compile or is otherwise
not ok); 3 when a part could not run (timeout, crash) and nothing failed numerically; 2 without a
CUDA device (nothing is run).

Importing this module imports only the standard library; torch is imported by main(), and CUDA is
touched only after torch.cuda.is_available().
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PARTS = ("gpu_tests", "kernel_report", "benchmark", "model_check", "host")
# Seconds each part may run (timeout). gpu_tests and kernel_report run at the same time, then benchmark,
# model_check and host: at most 270 + 130 + 90 + 40 = 530 s of parts, under the 10 minutes one command may
# hold a lent H100 / H200. The test suite gets the most: it JIT-compiles every kernel variant its cases reach.
# model_check times 8 points x 2 providers x 3 directions (48 do_bench calls of about 0.15 s) after
# JIT-compiling the fused forward and backward configs of its 8 points.
TIMEOUT_S = {"gpu_tests": 270, "kernel_report": 270, "benchmark": 130, "model_check": 90, "host": 40}
BENCH_ARGS = ["--shapes", "4096x4096,4096x14336", "--tokens", "1,256,8192", "--ranks", "16", "--dtypes", "bf16",
              "--dropout", "0,0.1", "--providers", "fused,eager,addmm,gemm"]
BENCH_PROVIDERS = ("fused", "eager", "addmm", "gemm")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")  # benchmarks.sweep's (this module imports only the standard library)
# The points of the modeled table's fused / gemm misses (4096->1024 at 1024 tokens, r = 64; 4096->1024 at 8192,
# r = 16 and 64; 4096->4096 at 8192, r = 64) and the met points of the same shapes and token counts.
MODEL_CHECK_ARGS = ["--shapes", "4096x4096,4096x1024", "--tokens", "1024,8192", "--ranks", "16,64", "--dtypes", "bf16",
                    "--dropout", "0", "--providers", "fused,gemm", "--no-host"]
OUTPUT_TAIL = 4000  # characters of each part's stdout / stderr kept in the JSON
REPO_ROOT = Path(__file__).resolve().parent.parent

PASSED, FAILED, ERROR, SKIPPED = "passed", "failed", "error", "skipped"


class NoCudaError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Running a part
# ---------------------------------------------------------------------------------------------

def child_env() -> dict:
    """This environment without the interpreter and backend switches, with this process's sys.path (so
    the children import the same fused_lora, installed or not)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("FUSED_LORA_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def run_command(cmd: list[str], *, timeout: float, cwd: Path | None = None) -> dict:
    """Run cmd in its own process group; {cmd, returncode, stdout, stderr, seconds, timed_out}.

    On timeout the whole group is killed (kernel_report's compile workers too) and returncode is None.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return {"cmd": cmd, "returncode": None if timed_out else proc.returncode, "stdout": stdout, "stderr": stderr,
            "seconds": round(time.perf_counter() - started, 1), "timed_out": timed_out}


def _tail(text: str | None) -> str:
    return (text or "")[-OUTPUT_TAIL:]


def _ran(result: dict, run: dict) -> dict:
    """result plus the command, its exit, time and output tails."""
    return {**result, "cmd": " ".join(run["cmd"]), "returncode": run["returncode"], "seconds": run["seconds"],
            "timed_out": run["timed_out"], "stdout_tail": _tail(run["stdout"]), "stderr_tail": _tail(run["stderr"])}


def _not_run(run: dict) -> str | None:
    if run["timed_out"]:
        return f"timed out after {run['seconds']:.0f} s"
    return None


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------

def parse_junit(path: Path) -> dict:
    """{"tests", "passed", "failed", "errors", "skipped", "failures": [{"name", "message"}]} from pytest's XML."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        bad = case.find("failure") if "failure" in kinds else case.find("error")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            failures.append({"name": name, "kind": bad.tag, "message": (bad.get("message") or "")[:300]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def check_gpu_tests(out: Path, timeout: float) -> dict:
    xml = out / "gpu_tests.xml"
    if not (REPO_ROOT / "tests").is_dir():
        return {"status": ERROR, "reason": f"no tests/ next to the package ({REPO_ROOT}): run from a source checkout"}
    if xml.exists():
        xml.unlink()
    run = run_command([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                       f"--junitxml={xml}"], timeout=timeout, cwd=REPO_ROOT)
    reason = _not_run(run)
    if reason or not xml.exists():
        return _ran({"status": ERROR, "reason": reason or f"pytest exited {run['returncode']} without a report"}, run)
    summary = parse_junit(xml)
    if summary["failed"] or summary["errors"]:
        status, reason = FAILED, f"{summary['failed']} failed, {summary['errors']} errors"
    elif summary["passed"] == 0:
        status, reason = FAILED, "no gpu test ran (all skipped or none collected): nothing was checked on the GPU"
    elif run["returncode"] != 0:
        status, reason = ERROR, f"pytest exited {run['returncode']}"
    else:
        status, reason = PASSED, None
    return _ran({"status": status, "reason": reason, "junit_xml": str(xml), **summary}, run)


def check_kernel_report(arch: int, timeout: float) -> dict:
    from fused_lora.kernels import report as kernel_report

    if arch not in kernel_report.SHARED_LIMIT:
        return {"status": SKIPPED, "arch": arch,
                "reason": f"kernel_report knows sm_{'/sm_'.join(map(str, kernel_report.SHARED_LIMIT))}, not sm_{arch}"}
    jobs = max(1, (os.cpu_count() or 2) // 2)  # the other half for the gpu tests' JIT compiles
    run = run_command([sys.executable, "-m", "fused_lora.kernel_report", "--arch", str(arch), "--json",
                       "-j", str(jobs)], timeout=timeout)
    reason = _not_run(run)
    try:
        records = json.loads(run["stdout"]) if not reason else None
    except json.JSONDecodeError as e:
        records, reason = None, f"no JSON on stdout (exit {run['returncode']}): {e}"
    if records is None:
        return _ran({"status": ERROR, "arch": arch, "reason": reason}, run)
    bad = [r for r in records if not r.get("ok")]
    spills = [r for r in records if r.get("spill_bytes")]
    summary = {
        "arch": arch, "record_count": len(records), "not_ok": len(bad), "spilling": len(spills),
        "failed_compiles": sum(r.get("error") is not None for r in records),
        "max_registers": max((r["registers"] for r in records if r.get("registers") is not None), default=None),
        "max_shared_bytes": max((r["shared_bytes"] for r in records if r.get("shared_bytes") is not None),
                                default=None),
        "problems": [{"id": kernel_report.job_id(r), "problems": r.get("problems", [])} for r in bad],
        "by_kernel": _kernel_summary(records),
    }
    status = FAILED if bad or not records else PASSED
    reason = (f"{len(bad)} of {len(records)} records not ok ({len(spills)} spill)" if bad
              else "no records" if not records else None)
    return _ran({"status": status, "reason": reason, **summary, "records": records}, run)


def _kernel_summary(records: list[dict]) -> list[dict]:
    """Per kernel and dtype: records, registers range, max spill and shared bytes, mma kinds."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
    rows = []
    for (kernel, dtype), rs in groups.items():
        regs = [r["registers"] for r in rs if r.get("registers") is not None]
        rows.append({"kernel": kernel, "dtype": dtype, "records": len(rs),
                     "registers": f"{min(regs)}-{max(regs)}" if regs else "-",
                     "spill_bytes": max((r.get("spill_bytes") or 0 for r in rs), default=0),
                     "shared_bytes": max((r.get("shared_bytes") or 0 for r in rs), default=0),
                     "mma": "/".join(sorted({r.get("mma") or "-" for r in rs})),
                     "ok": all(r.get("ok") for r in rs)})
    return rows


def model_gpu(device_name: str) -> str:
    """The modeled table's preset (benchmarks.roofline.GPUS key) for this GPU: h200 on an H200, else h100."""
    return "h200" if "H200" in device_name.upper() else "h100"


def check_benchmark(out: Path, timeout: float, gpu: str = "h100", *, part: str = "benchmark",
                    args: list[str] = BENCH_ARGS) -> dict:
    """``fused-lora-bench --device cuda`` with ``args``, its modeled rows on the ``gpu`` preset."""
    bench_out = out / part
    run = run_command([sys.executable, "-m", "fused_lora.benchmarks", "--device", "cuda", *args, "--gpu", gpu,
                       "--out", str(bench_out), "--no-plots", "--quiet"], timeout=timeout)
    reason = _not_run(run)
    points = bench_out / "points.json"
    if reason or run["returncode"] != 0 or not points.exists():
        return _ran({"status": ERROR, "reason": reason or f"exited {run['returncode']}"}, run)
    data = json.loads(points.read_text())
    measured = data.get("measured", [])
    errors = [f"{r['provider']} {r['shape']} M={r['tokens']} p={r['dropout']}: {r['error']}"
              for r in measured if r.get("error")]
    status = ERROR if errors or not measured else PASSED
    return _ran({"status": status, "reason": "; ".join(errors)[:500] or (None if measured else "no points"),
                 "points_json": str(points), "measured": measured, "saved_bytes": data.get("saved_bytes", []),
                 "modeled": data.get("modeled", []), "bench_metadata": data.get("metadata", {}),
                 "warnings": data.get("warnings", [])}, run)


def check_model(out: Path, timeout: float, gpu: str = "h100") -> dict:
    """The benchmark at MODEL_CHECK_ARGS: fused and gemm measured where the modeled table misses its targets."""
    return check_benchmark(out, timeout, gpu, part="model_check", args=MODEL_CHECK_ARGS)


def check_host(out: Path, timeout: float) -> dict:
    host_out = out / "host"
    run = run_command([sys.executable, "-m", "fused_lora.benchmarks", "--host-only", "--device", "cuda",
                       "--out", str(host_out)], timeout=timeout)
    reason = _not_run(run)
    path = host_out / "host.json"
    if reason or not path.exists():
        return _ran({"status": ERROR, "reason": reason or f"exited {run['returncode']} without host.json"}, run)
    result = json.loads(path.read_text()).get("host_overhead")
    if run["returncode"] != 0 or not result:
        return _ran({"status": ERROR, "reason": f"exited {run['returncode']}"}, run)
    return _ran({"status": PASSED, "reason": None, **result}, run)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def _md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(v) -> str | None:
    return None if v is None else f"{v:.4g}"


def _mib(v) -> str | None:
    return None if v is None else f"{v / 2**20:.4g}"


def _x(a, b) -> str | None:
    return f"{a / b:.2f}x" if a is not None and b else None


def _status_line(name: str, part: dict) -> str:
    extra = f": {part['reason']}" if part.get("reason") else ""
    secs = f" ({part['seconds']:.0f} s)" if part.get("seconds") is not None else ""
    return f"- {name}: **{part['status']}**{extra}{secs}"


def benchmark_markdown(measured: list[dict]) -> str:
    by = {}
    for r in measured:
        by[(r["shape"], r["tokens"], r["dropout"], r["provider"])] = r
    keys = sorted({(r["in_features"], r["out_features"], r["shape"], r["tokens"], r["dropout"]) for r in measured})
    rows, mem = [], []
    for _, _, shape, tokens, p in keys:
        at = {prov: by.get((shape, tokens, p, prov), {}) for prov in BENCH_PROVIDERS}
        for d in DIRECTIONS:
            t = {prov: at[prov].get(f"{d}_ms") for prov in BENCH_PROVIDERS}
            fused = at["fused"]
            spread = (f"{_ms(fused[f'{d}_ms_p20'])}-{_ms(fused[f'{d}_ms_p80'])}"
                      if fused.get(f"{d}_ms_p20") is not None else None)
            rows.append([shape, tokens, p, d] + [_ms(t[prov]) for prov in BENCH_PROVIDERS] + [spread]
                        + [_x(t["eager"], t["fused"]), _x(t["addmm"], t["fused"]), _x(t["fused"], t["gemm"])])
        mem.append([shape, tokens, p] + [_mib(at[prov].get("peak_mem_bytes")) for prov in BENCH_PROVIDERS]
                   + [_mib(at[prov].get("saved_bytes")) for prov in ("fused", "eager")])
    times = _md_table(["shape", "tokens", "dropout", "direction"] + [f"{p} ms" for p in BENCH_PROVIDERS]
                      + ["fused p20-p80", "eager / fused", "addmm / fused", "fused / gemm"], rows)
    peaks = _md_table(["shape", "tokens", "dropout"] + [f"{p} peak MiB" for p in BENCH_PROVIDERS]
                      + ["fused saved MiB", "eager saved MiB"], mem)
    return (times + "\n\nPeak memory of one fwd+bwd above inputs and parameters, and the activations saved "
            "for backward:\n\n" + peaks)


def fused_over_gemm_target(tokens: int) -> float | None:
    """The modeled targets of fused / gemm, fwd+bwd: at most 1.30 at 1-1024 tokens, 1.08 from 8192 (none between)."""
    return 1.30 if tokens <= 1024 else 1.08 if tokens >= 8192 else None


def model_comparison(measured: list[dict], modeled: list[dict]) -> list[dict]:
    """Per point and direction where fused and gemm were both measured and modeled: each one's measured and modeled
    microseconds, and fused / gemm measured and modeled (with its target on the fwd+bwd rows)."""
    def key(r):
        return r["in_features"], r["out_features"], r["tokens"], r["r"], r["dropout"], r["dtype"]

    modeled_us = {(key(r), r["provider"], r["direction"]): r.get("modeled_us") for r in modeled}
    measured_by = {(key(r), r["provider"]): r for r in measured if not r.get("error")}
    rows = []
    for point in sorted({key(r) for r in measured}):
        for d in DIRECTIONS:
            ms = {p: measured_by.get((point, p), {}).get(f"{d}_ms") for p in ("fused", "gemm")}
            us = {p: modeled_us.get((point, p, d)) for p in ("fused", "gemm")}
            if None in (*ms.values(), *us.values()) or not (ms["gemm"] and us["gemm"]):
                continue
            K, N, tokens, r, p, dtype = point
            target = fused_over_gemm_target(tokens) if d == "fwd+bwd" else None
            rows.append({"shape": f"{K}->{N}", "tokens": tokens, "r": r, "dropout": p, "dtype": dtype, "direction": d,
                         "fused_us": ms["fused"] * 1e3, "fused_modeled_us": us["fused"],
                         "gemm_us": ms["gemm"] * 1e3, "gemm_modeled_us": us["gemm"],
                         "ratio": ms["fused"] / ms["gemm"], "modeled_ratio": us["fused"] / us["gemm"],
                         "target": target})
    return rows


def model_markdown(rows: list[dict], preset: str) -> str:
    """The comparison table, the spread of measured / modeled per provider, and the targets met both ways."""
    def met(ratio, target):
        return None if target is None else ("yes" if ratio <= target else "no")

    table = _md_table(
        ["shape", "tokens", "r", "dropout", "direction", "fused us", "modeled", "measured / modeled", "gemm us",
         "modeled", "measured / modeled", "fused / gemm", "modeled", "target", "met", "met modeled"],
        [[r["shape"], r["tokens"], r["r"], r["dropout"], r["direction"], f"{r['fused_us']:.1f}",
          f"{r['fused_modeled_us']:.1f}", f"{r['fused_us'] / r['fused_modeled_us']:.2f}", f"{r['gemm_us']:.1f}",
          f"{r['gemm_modeled_us']:.1f}", f"{r['gemm_us'] / r['gemm_modeled_us']:.2f}", f"{r['ratio']:.3f}",
          f"{r['modeled_ratio']:.3f}", None if r["target"] is None else f"{r['target']:.2f}",
          met(r["ratio"], r["target"]), met(r["modeled_ratio"], r["target"])] for r in rows])
    lines = [table, ""]
    for provider in ("fused", "gemm"):
        q = sorted(r[f"{provider}_us"] / r[f"{provider}_modeled_us"] for r in rows)
        lines.append(f"- {provider} measured / modeled ({preset}): median {q[len(q) // 2]:.2f}, "
                     f"{q[0]:.2f}-{q[-1]:.2f} over {len(q)} rows.")
    targets = [r for r in rows if r["target"] is not None]
    lines.append(f"- fused / gemm targets (fwd+bwd) met: measured {sum(r['ratio'] <= r['target'] for r in targets)}"
                 f" of {len(targets)}, modeled {sum(r['modeled_ratio'] <= r['target'] for r in targets)} of "
                 f"{len(targets)}.")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    meta, parts = report["metadata"], report["parts"]
    out = ["## Measured GPU results", "",
           f"{meta['device']} (sm_{meta['arch']}), torch {meta['torch']}, triton {meta['triton']}, commit "
           f"`{meta['git_commit'][:12]}`{' (with local changes)' if meta.get('git_dirty') else ''}, "
           f"{meta['date_utc']}. Command: `{meta['command']}` ({report['seconds']:.0f} s).", ""]
    out += [_status_line(name, parts[name]) for name in PARTS if name in parts] + [""]
    tests = parts.get("gpu_tests", {})
    if "tests" in tests:
        out += ["### GPU tests", "",
                f"`pytest -m gpu`: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                f"{tests['skipped']} skipped.", ""]
        out += [f"- `{f['name']}` ({f['kind']}): {f['message']}" for f in tests["failures"][:20]]
        out += [""] if tests["failures"] else []
    kr = parts.get("kernel_report", {})
    if "by_kernel" in kr:
        out += [f"### Compiled kernels, sm_{kr['arch']}", "",
                f"`python -m fused_lora.kernel_report --arch {kr['arch']} --json`: {kr['record_count']} records, "
                f"{kr['not_ok']} not ok, {kr['spilling']} spilling, {kr['failed_compiles']} failed compiles.", "",
                _md_table(["kernel", "dtype", "records", "registers", "spill bytes", "shared bytes (max)", "mma", "ok"],
                          [[f"`{r['kernel']}`", r["dtype"], r["records"], r["registers"], r["spill_bytes"],
                            r["shared_bytes"], r["mma"], "yes" if r["ok"] else "NO"] for r in kr["by_kernel"]]), ""]
        out += [f"- `{p['id']}`: {'; '.join(p['problems'])}" for p in kr["problems"][:20]]
        out += [""] if kr["problems"] else []
    bench = parts.get("benchmark", {})
    if bench.get("measured"):
        out += ["### fused vs eager (PEFT's formula), addmm and the bare GEMM", "",
                f"`{' '.join(['fused-lora-bench', '--device', 'cuda', *BENCH_ARGS])}`: triton.testing.do_bench "
                "median ms, r = 16, bf16; ratios above 1 in the eager / fused and addmm / fused columns mean fused "
                "is faster.", "", benchmark_markdown(bench["measured"]), ""]
    checked = [part for part in (bench, parts.get("model_check", {})) if part.get("measured")]
    rows = [row for part in checked for row in model_comparison(part["measured"], part.get("modeled", []))]
    if rows:
        preset = next((r.get("modeled_gpu") for part in checked for r in part.get("modeled", [])), None) or "H100 SXM"
        out += ["### Measured against the model", "",
                "The benchmark part's points and "
                f"`{' '.join(['fused-lora-bench', '--device', 'cuda', *MODEL_CHECK_ARGS])}` (the points where the "
                "modeled table misses a fused / gemm target, and met ones beside them): "
                f"triton.testing.do_bench median against the modeled time of the same point on the {preset} preset "
                f"(the ideal table: Triton efficiency 1.0; this GPU: {meta['device']}). A measured / modeled above 1 "
                "means the model is optimistic there. Targets: fused / gemm fwd+bwd at most "
                f"{fused_over_gemm_target(1024):.2f} at 1-1024 tokens, {fused_over_gemm_target(8192):.2f} at 8192.",
                "", model_markdown(rows, preset), ""]
    host = parts.get("host", {})
    if host.get("rows"):
        out += ["### Host overhead", "",
                f"`{host['command']}`: {host['clock']} of one forward+backward of a tiny layer ({host['shape']}) "
                "with the Triton kernels stubbed out, against PEFT's formula in eager torch; minimum over rounds, "
                "1 thread.", "",
                _md_table(["dropout", "fused us", "eager us", "fused / eager"],
                          [[r["dropout"], f"{r['fused_us']:.1f}", f"{r['eager_us']:.1f}", f"{r['ratio']:.2f}"]
                           for r in host["rows"]]), ""]
    return "\n".join(out).rstrip() + "\n"


def exit_status(parts: dict) -> int:
    statuses = [p["status"] for p in parts.values()]
    if FAILED in statuses:
        return 1
    if ERROR in statuses:
        return 3
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def device_metadata(argv: list[str]) -> dict:
    """The benchmark's run metadata (device, versions, commit, date) plus the arch; NoCudaError without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError("no CUDA device (torch.cuda.is_available() is False): the GPU check needs one; "
                          "nothing was run. On CPU, `pytest -m 'not gpu'` runs the interpreter tests.")
    from fused_lora.benchmarks import metadata as bench_metadata

    device = torch.device("cuda")
    meta = bench_metadata.run_metadata(device, "gpu-check", argv)
    major, minor = torch.cuda.get_device_capability(device)
    meta.update(arch=major * 10 + minor, command=" ".join(["python -m fused_lora.gpu_check", *argv]))
    return meta


def _write(out: Path, report: dict) -> None:
    with open(out / "gpu_check.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")


def run_parts(out: Path, arch: int, parts: tuple[str, ...], on_done, gpu: str = "h100") -> dict:
    """{part: result}: gpu_tests and kernel_report side by side, then benchmark, model_check and host; ``gpu``: the
    modeled preset of the benchmarks (model_gpu)."""
    results: dict = {}

    def guarded(name, fn, *args):
        try:
            result = fn(*args)
        except Exception as e:  # a part that breaks is recorded; the others still run
            result = {"status": ERROR, "reason": f"{type(e).__name__}: {e}"[:500]}
        results[name] = result
        on_done(name, result)

    first = [(n, f, a) for n, f, a in (("gpu_tests", check_gpu_tests, (out, TIMEOUT_S["gpu_tests"])),
                                       ("kernel_report", check_kernel_report, (arch, TIMEOUT_S["kernel_report"])))
             if n in parts]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(guarded, n, f, *a) for n, f, a in first]:
            future.result()
    if "benchmark" in parts:
        guarded("benchmark", check_benchmark, out, TIMEOUT_S["benchmark"], gpu)
    if "model_check" in parts:
        guarded("model_check", check_model, out, TIMEOUT_S["model_check"], gpu)
    if "host" in parts:
        guarded("host", check_host, out, TIMEOUT_S["host"])
    return {name: results[name] for name in PARTS if name in results}


def _parse_parts(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m fused_lora.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json, gpu_check.md and the parts' files")
    p.add_argument("--parts", type=_parse_parts, default=PARTS, help=f"subset of {','.join(PARTS)} (default: all)")
    args = p.parse_args(argv)
    try:
        meta = device_metadata(argv)
    except NoCudaError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()  # absolute: pytest runs from the repository root
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"metadata": meta, "parts": {}, "seconds": 0.0}

    lock = threading.Lock()  # gpu_tests and kernel_report finish on two threads

    def on_done(name, result):
        with lock:
            report["parts"][name] = result
            report["seconds"] = round(time.perf_counter() - started, 1)
            print(f"gpu_check: {name} {result['status']}" + (f" ({result['reason']})" if result.get("reason") else ""),
                  file=sys.stderr, flush=True)
            _write(out, report)  # after each part: a check cut short still leaves what it had

    report["parts"] = run_parts(out, meta["arch"], args.parts, on_done, model_gpu(meta["device"]))
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["exit_status"] = exit_status(report["parts"])
    _write(out, report)
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    print(text)
    print(f"gpu_check: wrote gpu_check.json and gpu_check.md to {out}/; exit status {report['exit_status']}",
          file=sys.stderr)
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
