"""Tolerances that follow from the dtype and the length of the reduction, never from the machine.

The same sum of ``n`` terms computed in two summation orders (another BLAS kernel or blocking, AVX-512
against AVX2, a batch of T rows against one row at a time) differs by at most twice the worst-case
rounding error of one order, ``gamma_n * sum_i |term_i|`` with ``gamma_n = n u / (1 - n u)`` and unit
roundoff ``u = eps / 2`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed. 2002, eq. 3.5).
"""

from __future__ import annotations

import torch


def reduction_atol(dtype: torch.dtype, n: int, magnitude: float) -> float:
    """Absolute tolerance between two summation orders of ``n`` terms in ``dtype`` whose absolute values
    sum to about ``magnitude`` (for a chain of reductions, ``n`` is the sum of their lengths)."""
    u = torch.finfo(dtype).eps / 2
    gamma = n * u / (1 - n * u)
    return 2 * gamma * magnitude
