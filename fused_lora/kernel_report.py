"""``python -m fused_lora.kernel_report``: an alias of ``python -m fused_lora.kernels.report``, the
ahead-of-time compile report of the kernels (registers, spills, shared memory, MMA kind, int64 offsets).

Its names are the report's, looked up on first use: importing this imports neither triton nor the kernels.
"""
import sys


def __getattr__(name):
    from fused_lora.kernels import report
    return getattr(report, name)


if __name__ == "__main__":
    from fused_lora.kernels.report import main
    sys.exit(main())
