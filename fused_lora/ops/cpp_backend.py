"""The C++ CPU path (csrc/cpu): built just in time on first use, then loaded from a cache.

Same contract as the torch CPU path: forward returns (y, S), backward returns (dX, dA, dB) with None for a
grad not needed. load() also puts the C++ kernels in the CPU dispatch slot of fused_lora::lora_linear_fwd
/ lora_linear_bwd (a torch::Library(IMPL, "fused_lora", CPU) that the extension owns: TORCH_LIBRARY_IMPL's
registration, but one that cpu_kernels_registered(False) can hand back), except under TRITON_INTERPRET=1.
The ops must be defined first: load() imports fused_lora. Once the slot is taken, compiled graphs run the
C++ kernels on CPU whatever FUSED_LORA_BACKEND says later; eager calls read it on every call.

Build: torch.utils.cpp_extension.load with ninja, CPU only (no CUDA toolkit needed), -O3, and -fopenmp at
compile time only when torch's ATen parallel backend is OpenMP: at::parallel_for is a header template that
runs its body serially without _OPENMP. The link adds no OpenMP library, so GOMP symbols resolve to the
runtime torch already loaded (libtorch_cpu needs libgomp.so.1) and no second runtime comes in.
Cache: $FUSED_LORA_CPP_CACHE, else ~/.cache/fused_lora/cpp, in a folder named by torch version, Python
version and a hash of the sources and flags, so a new torch or an edited source builds afresh.
Nothing is built at import; available() / load() build on first call.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from ..kernels._interpreter import interpreting

_NAME = "fused_lora_cpu"
_SOURCES = ("lora_linear.cpp", "philox.h")
_lock = threading.Lock()
_module = None
_error: str | None = None
_warned = False


def source_dir() -> Path:
    """csrc/cpu of the repository this package sits in (looked up upwards: the module may move)."""
    here = Path(__file__).resolve().parent
    for root in (here, *here.parents):
        if (root / "csrc" / "cpu" / _SOURCES[0]).is_file():
            return root / "csrc" / "cpu"
    return here.parent / "csrc" / "cpu"


def _cflags() -> list[str]:
    flags = ["-O3"]
    if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        flags.append("-fopenmp")
    return flags


def build_dir() -> Path:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode())
        h.update((source_dir() / name).read_bytes())
    h.update(" ".join(_cflags()).encode())
    tag = (f"torch-{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{platform.machine()}-{h.hexdigest()[:16]}")
    root = os.environ.get("FUSED_LORA_CPP_CACHE") or os.path.join(Path.home(), ".cache", "fused_lora", "cpp")
    return Path(root) / tag


def _missing_tool() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found on PATH; set CXX or install g++)"
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError:  # pragma: no cover
        return "torch.utils.cpp_extension is unavailable"
    if not is_ninja_available():
        return "ninja not found (pip install ninja)"
    missing = [n for n in _SOURCES if not (source_dir() / n).is_file()]
    if missing:
        return f"sources missing from {source_dir()}: {', '.join(missing)}"
    return None


def load():
    """The compiled extension (built on first call); raises RuntimeError naming why it could not be built."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        reason = _missing_tool()
        if reason is None:
            try:
                from torch.utils.cpp_extension import load as cpp_load
                directory = build_dir()
                directory.mkdir(parents=True, exist_ok=True)
                if not (directory / f"{_NAME}.so").exists():
                    # The first build took 28-33 s on 2 cores: say why the first CPU call stalls.
                    print(f"fused_lora: building the C++ CPU kernels (once per torch version and source; "
                          f"about 30 s on 2 cores) in {directory}", file=sys.stderr, flush=True)
                module = cpp_load(name=_NAME, sources=[str(source_dir() / "lora_linear.cpp")],
                                  extra_cflags=_cflags(), extra_include_paths=[str(source_dir())],
                                  build_directory=str(directory), with_cuda=False, verbose=False)
                import fused_lora  # noqa: F401  (defines the ops' schemas, which the registration needs)
                if not interpreting():
                    # Under TRITON_INTERPRET=1 CPU tensors belong to the Triton path unless FUSED_LORA_BACKEND
                    # says otherwise, so the CPU slot stays with the ops' default, which asks select_backend
                    # on every call; cpu_kernels_registered(True) takes it anyway.
                    module.register_cpu_kernels()
                _module = module
                return _module
            except Exception as exc:  # compiler errors, permissions, ...
                reason = f"building the extension failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}"
        _error = f"fused_lora C++ CPU backend unavailable: {reason}"
        raise RuntimeError(_error)


def cpu_kernels_registered(on: bool) -> None:
    """Put the C++ kernels in the ops' CPU dispatch slot (on) or hand it back (off); loads the extension."""
    module = load()
    (module.register_cpu_kernels if on else module.deregister_cpu_kernels)()


def available() -> bool:
    """Whether the extension builds and loads; tried once, and on failure warns once with the reason."""
    global _warned
    try:
        load()
        return True
    except RuntimeError as exc:
        if not _warned:
            _warned = True
            warnings.warn(f"{exc}; the torch CPU path is used instead", RuntimeWarning, stacklevel=2)
        return False


def _seed(seed) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return seed
    value = int(seed) & ((1 << 64) - 1)  # the seed's 64 bits, as fused_lora.dropout reads them
    return torch.tensor(value - (1 << 64) if value >= 1 << 63 else value, dtype=torch.int64)


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return tuple(load().forward(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), _seed(seed)))


def backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    return tuple(load().backward(dy, x, weight, lora_A, lora_B, s, float(scaling), float(dropout_p), _seed(seed),
                                 bool(need_dx), bool(need_dA), bool(need_dB)))
