"""Time embedding and the control networks of the learned samplers.

The control is in score units and follows the parametrisations that work in PIS / DIS:
``v(t, x) = NN(t, x) + NN_t(t) * guide(t, x)``, where ``guide`` is the (clipped) target score (PIS)
or its interpolation with the prior score (DIS), ``NN`` has a zero-initialised last layer, and the
scalar ``NN_t`` starts at ``guide_scale_init``: at initialisation the drift is a multiple of the guide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FourierTimeEmbedding", "ControlNetwork"]


class FourierTimeEmbedding(nn.Module):
    """``tau -> [sin(w tau), cos(w tau)]`` with ``num_frequencies`` fixed frequencies ``w`` in
    ``linspace(0.1, max_frequency)``; ``tau`` (normalised time in [0, 1]) of shape ``(..., 1)``
    gives ``(..., 2 * num_frequencies)``."""

    def __init__(self, num_frequencies: int = 64, max_frequency: float = 100.0):
        super().__init__()
        self.register_buffer("frequencies", torch.linspace(0.1, max_frequency, num_frequencies))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        phase = tau * self.frequencies.to(tau.dtype)
        return torch.cat([phase.sin(), phase.cos()], dim=-1)


class _RowsLinear(torch.autograd.Function):
    """``x W^T + b`` on many rows whose weight gradient puts the narrow side first: ``g^T x`` when
    ``d_out <= d_in``, ``(x^T g)^T`` otherwise (a ``narrow x rows`` by ``rows x wide`` product).

    Same numbers as :func:`torch.nn.functional.linear`. On CPU (MKL) autograd's ``wide x rows`` by
    ``rows x narrow`` product for the ``64 -> d`` output layer costs ~10x more at K*N ~ 4e5 rows
    (0.5 s vs 0.05 s at batch 2048 x 200 steps). The backward uses differentiable ops (double
    backward works).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        rows_grad, rows_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            d_out, d_in = weight.shape
            grad_weight = rows_grad.t() @ rows_x if d_out <= d_in else (rows_x.t() @ rows_grad).t()
        if ctx.needs_input_grad[2]:
            grad_bias = rows_grad.sum(0)
        return grad_x, grad_weight, grad_bias


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _linear(x, weight, bias):
    """``F.linear``; through :class:`_RowsLinear` for a non-square weight that needs a gradient
    (not under autocast, whose casts a custom function would bypass)."""
    if (weight.shape[0] != weight.shape[1] and weight.requires_grad and torch.is_grad_enabled()
            and not _autocast_enabled(x.device.type)):
        return _RowsLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _state_branch(weights, hidden, guide_scale, x, guide):
    """``W_L gelu(... gelu(W_0 x + b_0 + hidden)) + b_L + guide_scale * guide``; ``weights`` is
    ``(W_0, b_0, ..., W_L, b_L)``."""
    h = _linear(x, weights[0], weights[1]) + hidden
    for i in range(2, len(weights), 2):
        h = _linear(F.gelu(h), weights[i], weights[i + 1])
    if guide is not None:
        h = h + guide_scale * guide
    return h


_COMPILED: dict = {}


def _compiled_state_branch(backend: str):
    """:func:`_state_branch` through ``torch.compile(backend=backend)``, built on first use and
    shared by all networks (the weights are arguments: one graph per input shape)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_state_branch, dynamic=False, backend=backend)
    return _COMPILED[backend]


def _mlp(sizes, activation=nn.GELU):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(activation())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class ControlNetwork(nn.Module):
    """``v(tau, x, guide) = NN(tau, x) + NN_t(tau) * guide`` (the PIS "FourierMLP" architecture).

    :param int dim: state dimension ``d``.
    :param int hidden_dim: width of every hidden layer (64).
    :param int num_layers: hidden layers of the state-time network (3).
    :param int num_frequencies: Fourier features of time (64).
    :param float guide_scale_init: initial value of ``NN_t`` (the bias of its last layer).
    :param int chunk_rows: inputs of more rows are evaluated in slices along their first axis of
        about this many rows (16384; ``None``: one call). Same numbers; on CPU the batched loss
        (K * N rows) runs ~1.7x faster forward + backward, its activations staying in cache.

    Shapes: ``tau`` broadcastable to ``x.shape[:-1] + (1,)`` (a per-step scalar is cheap: the time
    branch then runs on one row), ``x`` and ``guide`` ``(..., d)``; returns ``(..., d)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int = 64,
        num_layers: int = 3,
        num_frequencies: int = 64,
        guide_scale_init: float = 1.0,
        chunk_rows: int | None = 16384,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        self.dim = dim
        self.chunk_rows = chunk_rows
        #: ``torch.compile`` backend of the state branch (``DiffusionSampler(compile=True)`` sets
        #: ``"inductor"``), or None: eager
        self.compiled: str | None = None
        self.time_embedding = FourierTimeEmbedding(num_frequencies)
        width = 2 * num_frequencies
        self.time_net = _mlp([width, hidden_dim, hidden_dim])
        self.state_net = nn.Linear(dim, hidden_dim)
        self.body = nn.Sequential(nn.GELU(), _mlp([hidden_dim] * num_layers + [dim]))
        self.guide_scale = _mlp([width, hidden_dim, hidden_dim, 1])
        last = self.body[-1][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        nn.init.zeros_(self.guide_scale[-1].weight)
        nn.init.constant_(self.guide_scale[-1].bias, guide_scale_init)
        self._linears = tuple(m for m in self.body.modules() if isinstance(m, nn.Linear))

    def time_features(self, tau: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The time branch: ``(NN_time(tau), NN_t(tau))`` of shapes ``(..., hidden)`` and ``(..., 1)``.

        The samplers evaluate it once for the whole time grid and reuse it at every step.
        """
        tau = torch.as_tensor(tau, dtype=self.state_net.weight.dtype, device=self.state_net.weight.device)
        if tau.dim() == 0 or tau.shape[-1:] != (1,):
            tau = tau[..., None]
        emb = self.time_embedding(tau)
        return self.time_net(emb), self.guide_scale(emb)

    def forward_with_time_features(
        self,
        time_features: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        guide: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The state branch given :meth:`time_features` (functional: no module dispatch per layer),
        in slices of ``chunk_rows`` rows along the first axis of ``x``."""
        hidden, guide_scale = time_features
        rows = x.shape[:-1].numel()
        if self.chunk_rows is None or x.dim() < 2 or rows <= self.chunk_rows or x.shape[0] < 2:
            return self._state_branch(hidden, guide_scale, x, guide)
        step = max(1, self.chunk_rows * x.shape[0] // rows)  # slices of dim 0 per chunk
        num_chunks = -(-x.shape[0] // step)

        def parts(t):  # t's slices that meet x's (split: one gradient concatenation, no zero fill)
            if t is None or t.dim() < x.dim() or t.shape[0] == 1:
                return [t] * num_chunks
            return t.split(step)

        return torch.cat([
            self._state_branch(*args)
            for args in zip(parts(hidden), parts(guide_scale), x.split(step), parts(guide))
        ])

    def _state_branch(self, hidden, guide_scale, x, guide):
        weights = (self.state_net.weight, self.state_net.bias) + tuple(
            t for layer in self._linears for t in (layer.weight, layer.bias)
        )
        branch = _compiled_state_branch(self.compiled) if self.compiled else _state_branch
        return branch(weights, hidden, guide_scale, x, guide)

    def forward(
        self, tau: float | torch.Tensor, x: torch.Tensor, guide: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.forward_with_time_features(self.time_features(tau), x, guide)
