import pyro
import pytest
import torch
from hypothesis import settings

# Property-based tests draw the same examples on every run (CI must not fail by chance).
settings.register_profile("pyro_sde", derandomize=True, deadline=None)
settings.load_profile("pyro_sde")


@pytest.fixture(autouse=True)
def _seed_and_validate():
    """Every test: fixed seeds, Pyro validation on, a clean param store (as Pyro's own tests)."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
