"""One spy for the Triton kernels' launch path (fused_lora.kernels.launchers), shared by the tests."""
from __future__ import annotations

from dataclasses import dataclass, field

from fused_lora.kernels import launchers

KERNELS = ("_lora_shrink_kernel", "_lora_fwd_kernel", "_lora_bwd_dy_kernel", "_lora_bwd_dx_kernel",
           "_lora_bwd_da_kernel", "_lora_bwd_dx_da_db_kernel")


@dataclass
class Launch:
    kernel: str
    grid: tuple
    kwargs: dict
    seen: object = None  # what ``on_launch`` returned at the launch

    @property
    def constexprs(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if k.isupper() and k != "INPUT_PRECISION"}


@dataclass
class KernelSpy:
    """Stands in for ``launchers.<kernel>`` (``kernel[grid](*args, **kwargs)``): records each launch, then runs
    the real kernel. ``on_launch()``, when given, is called at each launch and its result kept."""
    kernel: str
    log: list = field(default_factory=list)
    on_launch: object = None

    def __post_init__(self):
        self.real = getattr(launchers, self.kernel)

    def __getitem__(self, grid):
        launch = self.real[grid]

        def run(*args, **kwargs):
            seen = self.on_launch() if self.on_launch else None
            self.log.append(Launch(self.kernel, tuple(grid), kwargs, seen))
            return launch(*args, **kwargs)

        return run


def spy_on_kernels(monkeypatch, kernels=KERNELS, log=None, on_launch=None) -> dict[str, KernelSpy]:
    """Replace each of ``kernels`` in fused_lora.kernels.launchers by a KernelSpy (monkeypatch undoes it);
    one shared ``log`` if given."""
    spies = {}
    for name in kernels:
        spies[name] = KernelSpy(name, log if log is not None else [], on_launch)
        monkeypatch.setattr(launchers, name, spies[name])
    return spies
