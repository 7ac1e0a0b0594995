"""The float32 screen of the exact search on a torch device (a GPU, or the CPU for tests).

Only the screen runs here: blocked GEMM ``|q|^2 + |u|^2 - 2 q.u`` in float32 and ``torch.topk``
on the device; the candidates then go through the same certified float64 re-ranking as every
other backend (``_knn._knn_fast``), so results equal the numpy oracle. TF32 is switched off
for the duration (its 10-bit products would break the float32 error bound the certificate uses).
torch is imported here only, when ``backend="torch"`` is asked for (or picked by "auto" in a
process that already uses CUDA): the SI core stays torch-free.

Memory on the device: the reference rows (m x d float32), one query block and one
``block x ref_block`` distance tile.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

_QUERY_BLOCK = 4096
_REF_BLOCK = 16384


def device_for(device=None):
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def _ieee_fp32():
    """float32 GEMMs in full float32 precision (no TF32) inside the block; settings restored."""
    import torch

    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    prev = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "ieee"
        else:
            matmul.allow_tf32 = False
        yield
    finally:
        if new_api:
            matmul.fp32_precision = prev
        else:
            matmul.allow_tf32 = prev


def screen_torch(Q32, U32, qn32, un32, kp: int, *, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``kp`` screened rows of ``U32`` (m, d) for each row of ``Q32`` (nq, d): (indices (nq, kp)
    int64, screened squared distances (nq, kp) float32, ascending). ``qn32``/``un32``: the rows'
    squared norms (float64 norms rounded to float32, as the other screens use). Inputs may be
    numpy arrays or torch tensors (a tensor already on ``device`` is used in place)."""
    import torch

    dev = device_for(device)
    nq, m = int(Q32.shape[0]), int(U32.shape[0])
    kp = int(min(kp, m))
    out_i = np.empty((nq, kp), np.int64)
    out_d = np.empty((nq, kp), np.float32)

    def on(a):
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device=dev, dtype=torch.float32)

    with torch.inference_mode(), _ieee_fp32():
        U, un, qn = on(U32), on(un32), on(qn32)
        Qall = Q32 if isinstance(Q32, torch.Tensor) else None
        for i0 in range(0, nq, _QUERY_BLOCK):
            i1 = min(i0 + _QUERY_BLOCK, nq)
            Qb = on(Qall[i0:i1] if Qall is not None else Q32[i0:i1])
            best_d = best_i = None
            for j0 in range(0, m, _REF_BLOCK):
                j1 = min(j0 + _REF_BLOCK, m)
                D = torch.addmm(un[None, j0:j1], Qb, U[j0:j1].T, beta=1.0, alpha=-2.0)
                D += qn[i0:i1, None]
                d, idx = torch.topk(D, min(kp, j1 - j0), dim=1, largest=False, sorted=True)
                idx += j0
                if best_d is None:
                    best_d, best_i = d, idx
                else:
                    cd, ci = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
                    best_d, pos = torch.topk(cd, kp, dim=1, largest=False, sorted=True)
                    best_i = torch.gather(ci, 1, pos)
            out_d[i0:i1] = best_d.cpu().numpy()
            out_i[i0:i1] = best_i.cpu().numpy()
    return out_i, out_d
