"""Tolerances derived from float32 round-off, for tests that compare two float32 computations of the same maths
(another summation order, another framework, another device layout) rather than one program with itself.

Gradients. Every gradient element is a float32 sum of per-token contributions, each itself the product of a chain of
matmuls; two programs (full batch vs micro-batches, our JAX vs PyTorch, one device vs a mesh) sum the same terms in
other groupings and get the terms from kernels with other blockings (which differ between CPUs: AVX2 vs AVX-512,
Intel vs AMD). The difference is round-off, proportional to the magnitude of the terms, not of the (possibly
cancelled) result, so it is bounded per leaf by ``c * u * max|g_leaf|`` (``u = 2**-24``), not relative to each
element. Blocked/pairwise summation of n <= 256 terms gives ``~log2(n) u`` per level of the backward pass; measured
on Intel Sapphire Rapids, every pair of our gradient computations (accumulation 1/2/4 vs each other, JAX vs torch,
the block-gradient cut on and off) differs by at most ``10 u max|g_leaf|``. :data:`GRAD_ROUNDOFF` takes ``c = 128``:
13x that, and still ~1e4 below what a real bug does (a dropped, doubled or mis-scaled micro-batch moves gradients by
``O(rms g)``, about ``0.2 max|g|`` here).

Adam. ``optax.adamw`` and ``torch.optim.AdamW`` move each parameter by ``lr * m_hat / (sqrt(v_hat) + eps)`` per step,
a direction of size ~1 whatever the gradient's size: where a gradient is comparable to its round-off (an exactly
zero gradient in exact arithmetic, e.g. the key bias of attention, or an element that happens to be tiny), two
float32 runs can move it by up to ~2 lr apart, and no fixed atol on the parameters is right for every element and
CPU. :func:`adam_direction_bound` bounds the difference per element from the gradient bound, ``lr``, ``eps`` and
the betas; :class:`AdamParamBound` accumulates it over steps.
"""

from __future__ import annotations

import jax
import numpy as np

U = 2.0 ** -24  # float32 unit round-off (half an ulp of 1.0)
GRAD_ROUNDOFF = 128 * U  # gradient round-off bound per leaf, in units of max|g_leaf| (see the module docstring)


def leaf_grad_atol(grad) -> float:
    """``GRAD_ROUNDOFF * max|g|``: the absolute round-off bound of one gradient leaf."""
    return GRAD_ROUNDOFF * float(np.max(np.abs(np.asarray(grad, np.float64))))


def assert_grads_close(ours, theirs, what: str = "") -> None:
    """Leaf-wise ``|ours - theirs| <= GRAD_ROUNDOFF * max|theirs_leaf|`` (rtol 0: the bound is per leaf)."""
    flat_ours = jax.tree_util.tree_flatten_with_path(ours)[0]
    flat_theirs = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(theirs)[0]}
    assert len(flat_ours) == len(flat_theirs)
    for key, value in flat_ours:
        name = jax.tree_util.keystr(key)
        ref = np.asarray(flat_theirs[name])
        np.testing.assert_allclose(np.asarray(value), ref, rtol=0, atol=leaf_grad_atol(ref), err_msg=what + name)


def global_norm_rtol(grads) -> float:
    """Bound on the relative round-off of the global gradient norm: ``||dg|| / ||g||`` with ``|dg|`` at most
    :func:`leaf_grad_atol` per element (triangle inequality), plus the norm's own float32 sum (``log2 n`` u)."""
    leaves = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grads)]
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in leaves))
    dnorm = np.sqrt(sum(g.size * leaf_grad_atol(g) ** 2 for g in leaves))
    n = sum(g.size for g in leaves)
    return dnorm / norm + np.log2(n) * U


def adam_direction_bound(t: int, s: np.ndarray, delta: np.ndarray, b1: float, b2: float, eps: float) -> np.ndarray:
    """Bound on ``|d(m_hat / (sqrt(v_hat) + eps))|`` after ``t`` Adam updates, per element.

    Args:
        t: the optimizer's step count (moments hold t gradients; bias-corrected).
        s: ``sqrt(v_hat)`` of one of the two runs, per element.
        delta: bound on the difference of each of the t gradients between the runs, per element.
        b1, b2, eps: Adam's hyper-parameters.

    With the normalised weights ``a_k`` of ``m_hat = sum a_k g_k`` and ``b_k`` of ``v_hat = sum b_k g_k**2``:
    ``|m_hat| <= R sqrt(v_hat)`` with ``R = sqrt(sum a_k**2 / b_k)`` (Cauchy-Schwarz), so the direction is at most R
    in size and two directions differ by at most ``2 R``. Its derivative in ``g_k`` is at most
    ``(a_k + R sqrt(b_k)) / (sqrt(v_hat) + eps)`` (using ``|g_k| <= sqrt(v_hat / b_k)``), and along the segment
    between the two runs' gradients ``sqrt(v_hat) >= s - delta`` (Minkowski), so by the mean value theorem the
    difference is at most ``K delta / (max(s - delta, 0) + eps)``, ``K = sum (a_k + R sqrt(b_k))``.
    """
    k = np.arange(1, t + 1)
    a = (1 - b1) * b1 ** (t - k) / (1 - b1 ** t)
    b = (1 - b2) * b2 ** (t - k) / (1 - b2 ** t)
    r = np.sqrt(np.sum(a * a / b))
    lipschitz = np.sum(a + r * np.sqrt(b))
    return np.minimum(2 * r, lipschitz * delta / (np.maximum(s - delta, 0.0) + eps))


class AdamParamBound:
    """Per-element bound on ``|p_run1 - p_run2|`` after AdamW steps from equal params, updated step by step.

    Each step adds ``lr * adam_direction_bound(...)`` (weight decay multiplies an existing difference by
    ``1 - lr * wd <= 1``) and the float32 rounding of the update on each side (``2 u |p|`` each: the decay and the
    step). Assumed: the gradient bound ``delta`` holds along the trajectory; the parameter differences it allows are
    either ~1e-7 (elements with a real gradient) or in elements whose gradient is round-off, which barely move the
    loss, so the next gradients differ by far less than ``delta``.
    """

    def __init__(self, b1: float, b2: float, eps: float):
        self.b1, self.b2, self.eps = b1, b2, eps
        self.t = 0
        self.delta = None  # running max over steps of the per-element gradient bound
        self.atol = None

    def step(self, lr: float, s: np.ndarray, delta: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Account for one update with learning rate ``lr``, ``s = sqrt(v_hat)`` after it and this step's gradient
        bound ``delta``; returns the bound on the params after it."""
        self.t += 1
        self.delta = delta if self.delta is None else np.maximum(self.delta, delta)
        direction = adam_direction_bound(self.t, s, self.delta, self.b1, self.b2, self.eps)
        rounding = 4 * U * np.abs(params)
        self.atol = (0.0 if self.atol is None else self.atol) + lr * direction + rounding
        return self.atol
