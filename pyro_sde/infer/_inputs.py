"""Set-up checks shared by the inference algorithms (DiffusionSampler, SMCSampler)."""

from __future__ import annotations

import torch


def check_target(model, log_density, score) -> None:
    """Exactly one of a Pyro ``model`` and a ``log_density``; a closed-form ``score`` only with the latter."""
    if (model is None) == (log_density is None):
        raise ValueError("give exactly one of `model` (a Pyro model) and `log_density`")
    if score is not None and log_density is None:
        raise ValueError("`score` goes with `log_density` (a model's score comes from autograd)")
    if model is not None and not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")


def check_dtype_device(model, dtype, device):
    """Refuse what cannot be honoured: a non-floating ``dtype``, an unavailable ``device``, and either
    with a Pyro model (whose tensors decide its dtype and device)."""
    if model is not None and (dtype is not None or device is not None):
        raise ValueError(
            "dtype and device apply to `log_density` only: a Pyro model runs in the dtype and on the "
            "device of its own tensors (give it float64 / CUDA data instead)"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if device is None:
        return None
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as e:
        raise ValueError(f"device {str(device)!r} is not available on this machine: {e}") from e
    return device


def cast_output(fn, dtype):
    """``fn`` with its output cast to ``dtype`` (a float32 log density run in a float64 sampler)."""

    def cast(z):
        out = fn(z)
        return out.to(dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    return cast


def same_call(a, b) -> bool:
    """Whether two ``(args, kwargs)`` model calls pass the very same objects."""
    (args_a, kw_a), (args_b, kw_b) = a, b
    return (
        len(args_a) == len(args_b)
        and all(x is y for x, y in zip(args_a, args_b))
        and kw_a.keys() == kw_b.keys()
        and all(kw_a[k] is kw_b[k] for k in kw_a)
    )
