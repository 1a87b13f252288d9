"""fused_lora.lora_embedding: input checks and backend choice; the op is in ops/embedding.py."""
from __future__ import annotations

import math

from . import reference
from ._validation import ALL_DTYPES, check_embedding_inputs
from .functional import forced_backend_for
from .ops.embedding import lora_embedding_1d


def lora_embedding(ids, weight, lora_A, lora_B, scaling, *, padding_idx=None, scale_grad_by_freq=False):
    """y = E[ids] + scaling * (A^T[ids]) B^T, PEFT's lora.Embedding, with fused kernels on CUDA.

    ids: int64 or int32 (...), every id in [0, V) (IndexError otherwise); weight E: (V, D);
    lora_A = lora_embedding_A: (r, V); lora_B = lora_embedding_B: (D, r); 1 <= r <= 256. Returns
    (..., D) in weight's dtype. padding_idx (None, or an int in [-V, V)): that row of E and column of A
    get no gradient, as F.embedding's padding_idx (the forward still reads them). scale_grad_by_freq:
    the grads of E and A divided by each id's count in ids, as F.embedding's. Differentiable in lora_A,
    lora_B, and weight when it requires grad. Autocast does not change it (as F.embedding).
    """
    padding = check_embedding_inputs(ids, weight, lora_A, lora_B, scaling, padding_idx, dtypes=ALL_DTYPES)
    backend = forced_backend_for(weight, "weight")
    scaling = float(scaling)
    scale_grad_by_freq = bool(scale_grad_by_freq)
    if backend == "reference":
        return reference.lora_embedding(ids, weight, lora_A, lora_B, scaling, padding_idx=padding_idx,
                                        scale_grad_by_freq=scale_grad_by_freq)
    flat = ids.reshape(math.prod(ids.shape))
    if not flat.is_contiguous():
        flat = flat.contiguous()
    y = lora_embedding_1d(flat, weight, lora_A, lora_B, scaling, padding, scale_grad_by_freq)
    return y.reshape(*ids.shape, weight.shape[1])
