"""The top singular subspace of a layer's gradient, without ever holding the dense gradient.

The Gradient-Aligned start needs only the top ``2r`` singular triplets of each adapted
layer's ``G = sum_tokens g^T x``. Holding ``G`` densely costs ``d_out x d_in`` fp32 per
layer (~26 GB for every layer of a 7B model at once), and forming it costs
``d_out * T * d_in`` flops per layer per batch, as much as the layer's weight gradient.

A streaming randomized sketch (Tropp, Yurtsever, Udell & Cevher 2017, "Practical
sketching algorithms for low-rank matrix approximation", single-pass scheme) keeps two
small linear images of ``G`` instead:

    range sketch     Y = G Omega   (d_out x k),  accumulated as g^T (x Omega)
    co-range sketch  Z = Psi G     (l x d_in),   accumulated as (Psi g^T) x

with Gaussian test matrices ``Omega`` (``d_in x k``) and ``Psi`` (``l x d_out``). Both
sketches are linear in ``G``: a mean over batches or over ranks of the sketches is the
sketch of the mean gradient, exactly. Afterwards ``Q = qr(Y)``, ``X = (Psi Q)^+ Z``
(so ``G ~ Q X``) and the SVD of the small ``k x d_in`` matrix ``X`` give the top
triplets. The test matrices come from a private seeded generator (the caller's RNG is
never touched, and every rank draws the same ones) and are shared between layers of the
same dimension, so they cost nothing per layer.

Layers too small for a sketch to be smaller than ``G`` keep the dense gradient and the
exact SVD (:class:`DenseGradient`), the published computation.
"""

from __future__ import annotations

import hashlib

import torch

from .lowrank import dense_top_svd

__all__ = [
    "GA_ESTIMATORS",
    "RANGE_OVERSAMPLE",
    "CORANGE_OVERSAMPLE",
    "sketch_sizes",
    "TestMatrices",
    "DenseGradient",
    "SketchedGradient",
]

Tensor = torch.Tensor

#: Range sketch width ``k = q + RANGE_OVERSAMPLE`` for ``q`` wanted directions (``q = 2r``).
RANGE_OVERSAMPLE = 8
#: Co-range sketch height ``l = k + CORANGE_OVERSAMPLE``: solving ``(Psi Q) X = Z`` needs ``l > k``
#: and its error grows like ``k / (l - k - 1)``.
#: Both sizes were chosen on real SmolLM2-135M gradients: memory against the share of gradient
#: energy kept, measured in docs/benchmarks.md ("GA cost").
CORANGE_OVERSAMPLE = 16


#: how the top-2r gradient subspace is found: streaming sketches, or the dense gradient and its SVD
GA_ESTIMATORS = ("sketch", "dense")

def sketch_sizes(q: int, d_out: int, d_in: int) -> tuple[int, int] | None:
    """``(k, l)`` for ``q`` wanted directions of a ``d_out x d_in`` gradient, or ``None`` for dense.

    ``None`` when the two sketches would not be smaller than the dense gradient itself
    (or could not be wider than ``q``): there the dense gradient and the exact SVD cost
    no more memory and are exact.
    """
    k = q + RANGE_OVERSAMPLE
    l = k + CORANGE_OVERSAMPLE
    if k >= min(d_out, d_in) or l >= d_out or d_out * k + l * d_in >= d_out * d_in:
        return None
    return k, l


def _seed(base: int, role: str, dim: int, size: int) -> int:
    """A stable 63-bit seed per (role, dimension, sketch size); no dependence on Python's hash salt."""
    digest = hashlib.sha256(f"{base}/{role}/{dim}/{size}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TestMatrices:
    """Gaussian test matrices, drawn once per (role, dimension, size, device) and shared by layers.

    Drawn on the CPU from a private ``torch.Generator`` seeded by ``seed`` and the shape,
    then moved: the same matrices on every rank and device, and the global RNG untouched.
    """

    __test__ = False  # not a pytest class

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._cache: dict[tuple, Tensor] = {}

    def omega(self, d_in: int, k: int, device) -> Tensor:
        """``d_in x k`` range test matrix."""
        return self._get("omega", d_in, k, device, transpose=True)

    def psi(self, d_out: int, l: int, device) -> Tensor:
        """``l x d_out`` co-range test matrix."""
        return self._get("psi", d_out, l, device, transpose=False)

    def _get(self, role: str, dim: int, size: int, device, transpose: bool) -> Tensor:
        key = (role, dim, size, str(torch.device(device)))
        if key not in self._cache:
            gen = torch.Generator(device="cpu").manual_seed(_seed(self.seed, role, dim, size))
            m = torch.randn(size, dim, generator=gen, dtype=torch.float32)
            self._cache[key] = (m.T.contiguous() if transpose else m).to(device)
        return self._cache[key]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache.values())


def _check_finite(name: str, *tensors: Tensor) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ValueError(f"{name}: the gradient estimate contains NaN or Inf")


class DenseGradient:
    """The dense gradient ``G`` itself; top triplets by ``lowrank.dense_top_svd`` (exact up to 2048)."""

    kind = "dense"

    def __init__(self, grad: Tensor):
        if grad.dim() != 2:
            raise ValueError(f"gradient must be 2-D, got shape {tuple(grad.shape)}")
        self.grad = grad
        self.buffer_shapes = {tuple(grad.shape)}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.grad.shape)

    @property
    def nbytes(self) -> int:
        return self.grad.numel() * self.grad.element_size()

    def add(self, x: Tensor, g: Tensor) -> None:
        """Accumulate ``g^T x`` for ``x`` (tokens x d_in) and ``g`` (tokens x d_out), both fp32."""
        self.grad.addmm_(g.T, x)

    def apply(self, fn) -> None:
        """Replace the accumulated state by ``fn(state)`` (a scale, a cross-rank mean: anything linear)."""
        self.grad = fn(self.grad)

    def top_singular(self, q: int) -> tuple[Tensor, Tensor, Tensor]:
        _check_finite("DenseGradient", self.grad)
        return dense_top_svd(self.grad, q)


class SketchedGradient:
    """Range and co-range sketches ``(Y, Z)`` of one layer's gradient; top triplets by reconstruction.

    Memory ``d_out k + l d_in`` fp32 (the test matrices are shared, see :class:`TestMatrices`),
    and ``T (k + l)(d_in + d_out)`` flops per batch of ``T`` tokens instead of ``T d_out d_in``.
    """

    kind = "sketch"

    def __init__(self, d_out: int, d_in: int, k: int, l: int, tests: TestMatrices, device="cpu"):
        if not 0 < k < l:
            raise ValueError(f"SketchedGradient: need 0 < k < l, got k={k}, l={l}")
        self.omega = tests.omega(d_in, k, device)  # d_in x k, shared
        self.psi = tests.psi(d_out, l, device)  # l x d_out, shared
        self.Y = torch.zeros(d_out, k, device=device)
        self.Z = torch.zeros(l, d_in, device=device)
        #: shapes of every tensor this estimate allocated (state and per-batch temporaries)
        self.buffer_shapes = {(d_out, k), (l, d_in)}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.Y.shape[0], self.Z.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held for this layer alone (the shared test matrices are counted by their owner)."""
        return (self.Y.numel() + self.Z.numel()) * 4

    def add(self, x: Tensor, g: Tensor) -> None:
        """Accumulate the sketches of ``g^T x`` without forming it: ``g^T (x Omega)`` and ``(Psi g^T) x``."""
        x_omega = x @ self.omega  # T x k
        psi_g = self.psi @ g.T  # l x T
        self.Y.addmm_(g.T, x_omega)
        self.Z.addmm_(psi_g, x)
        self.buffer_shapes.update((tuple(x_omega.shape), tuple(psi_g.shape)))

    def apply(self, fn) -> None:
        """Apply a linear map to both sketches (scale, cross-rank mean): still the sketch of the mapped G."""
        self.Y = fn(self.Y)
        self.Z = fn(self.Z)

    def top_singular(self, q: int) -> tuple[Tensor, Tensor, Tensor]:
        """Approximate top-``q`` ``(U, S, V)`` of ``G`` (fp32): ``G ~ Q X``, ``X = (Psi Q)^+ Z``.

        Computed in fp64: the matrices are small (``d_out x k``, ``k x d_in``) and the
        least-squares step loses digits in fp32 when ``Psi Q`` is poorly conditioned.
        """
        _check_finite("SketchedGradient", self.Y, self.Z)
        k = self.Y.shape[1]
        if not 1 <= q <= k:
            raise ValueError(f"SketchedGradient: q={q} directions wanted from a sketch of width {k}")
        Y, Z, psi = self.Y.double(), self.Z.double(), self.psi.double()
        Q, _ = torch.linalg.qr(Y, mode="reduced")  # d_out x k
        Qp, Rp = torch.linalg.qr(psi @ Q, mode="reduced")  # (l x k) = Qp Rp, full column rank w.p. 1
        X = torch.linalg.solve_triangular(Rp, Qp.T @ Z, upper=True)  # k x d_in least-squares solution
        Ux, S, Vh = torch.linalg.svd(X, full_matrices=False)
        U = Q @ Ux[:, :q]
        return U.float(), S[:q].float(), Vh[:q].T.float()
