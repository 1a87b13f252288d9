"""Importing the package touches neither triton, CUDA, nor the optional peft / transformers / safetensors."""
import os
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
    # The interpreter's own bin first: a system ninja (1.11 in /usr/bin here) keeps another build log than the venv's
    # (1.13), so each alternation between them rebuilt the C++ kernels (26-31 s on 2 cores).
    env = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0",
           "PATH": os.pathsep.join((os.path.dirname(sys.executable), "/usr/bin", "/bin"))}
    # The session's C++ build cache: without it the CPU call below rebuilt the C++ kernels (40 s on 2 cores).
    env.update({k: os.environ[k] for k in ("FUSED_LORA_CPP_CACHE", "HOME") if k in os.environ})
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


def _imports(path):
    """The modules a source file imports (absolute names; relative ones resolved against its package)."""
    import ast
    from pathlib import Path

    package = "fused_lora.kernels" if Path(path).parent.name == "kernels" else None
    names = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module)
    return names


def test_kernels_import_nothing_from_the_public_api():
    """kernels/ (fused_lora.kernels) is below the API: no import of fused_lora outside fused_lora.kernels,
    not even a lazy one inside a function."""
    from pathlib import Path

    kernels = Path(__file__).resolve().parents[1] / "kernels"
    upward = {str(path.name): [name for name in _imports(path)
                               if name.split(".")[0] == "fused_lora" and not name.startswith("fused_lora.kernels")]
              for path in sorted(kernels.glob("*.py"))}
    assert len(upward) >= 8, upward  # the files were found
    assert {file: names for file, names in upward.items() if names} == {}
