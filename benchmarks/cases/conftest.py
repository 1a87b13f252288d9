"""pytest-benchmark cases: tiny CPU sizes by default (CI), real sizes under `pytest -m gpu` on a GPU.

tests/conftest.py does not apply here, so this one takes the same setup from tests/shared_conftest.py:
TRITON_INTERPRET=1 unless the run is `-m gpu`, set before triton is imported, so the kernel cases run
the real kernels in the interpreter on CPU, and the `cuda` fixture. The provider cases time
fused_lora's CPU path (torch backend) whatever TRITON_INTERPRET says.
"""
from shared_conftest import cuda, interpret_unless_gpu  # noqa: F401  (pytest finds the fixture here)


def pytest_configure(config):
    interpret_unless_gpu(config)
