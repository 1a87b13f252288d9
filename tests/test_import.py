"""Importing the package touches neither triton, CUDA, nor the optional peft / transformers / safetensors."""
import subprocess
import sys

import pytest

CHECK = """
import sys, torch
import fused_lora
assert 'triton' not in sys.modules, 'importing fused_lora imported triton'
assert not torch.cuda.is_initialized(), 'importing fused_lora initialised CUDA'
for optional in ('peft', 'transformers', 'safetensors'):
    assert optional not in sys.modules, f'importing fused_lora imported {optional}'
layer = fused_lora.LoRALinear(8, 4, r=2)
layer(torch.randn(2, 8)).sum().backward()
assert 'triton' not in sys.modules, 'the CPU path imported triton'
assert not torch.cuda.is_initialized()
print('ok')
"""


def test_import_touches_no_gpu():
    env = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("module", ["fused_lora.benchmarks.cli", "fused_lora.gpu_check"])
def test_entry_points_import_neither_triton_nor_cuda(module):
    check = (f"import sys, torch, {module}\n"
             "assert 'triton' not in sys.modules\nassert not torch.cuda.is_initialized()\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
