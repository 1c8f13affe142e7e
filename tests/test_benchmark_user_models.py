"""benchmarks/user_models.py: its float32 models are evaluated batched, as a user's would be."""

import pyro
import torch
from _benchmark_script import load_benchmark

from pyro_sde.infer import ModelPotential


def test_user_models_evaluate_batched_in_float32():
    bench = load_benchmark("user_models")
    for name, (model, args) in bench.data().items():
        pyro.set_rng_seed(0)
        potential = ModelPotential(model, args, {})
        assert potential.vectorize_mode in ("plate", "vmap"), name
        assert potential.dtype == torch.float32, name
        z = potential.initial_params + 0.1 * torch.randn(64, potential.dim)
        assert torch.isfinite(potential.log_density(z)).all(), name
