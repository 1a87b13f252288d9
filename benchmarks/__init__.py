"""fused-lora-bench: fused LoRA against unfused LoRA and a bare GEMM (installed as fused_lora.benchmarks)."""
