"""The ops: torch.library schemas, fakes and autograd (linear.py), the per-device implementations
(triton_backend.py, torch_backend.py) and the choice between them (dispatch.py)."""
