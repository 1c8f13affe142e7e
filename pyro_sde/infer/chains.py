"""``Chains``: independent runs of any sampler of the package, read as MCMC chains.

Each chain is a sampler of its own (its own preconditioner fit, training and random seed), run one after
the other. What ``MCMC(num_chains=K)`` users expect follows: ``get_samples(group_by_chain=True)`` gives
``(K, N, *shape)``, :meth:`Chains.summary` adds the split R-hat of the chains' (resampled) draws, and
:func:`pyro_sde.to_inference_data` gives ArviZ ``K`` chains. The log evidence combines the runs'
estimates ``Z_k``: ``log Z_hat = log mean_k Z_k`` (unbiased for ``Z`` when each ``Z_k`` is), with the
standard error of their spread, ``std(Z_k) / (mean(Z_k) sqrt(K))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from .. import diagnostics
from .._checks import positive_int

if TYPE_CHECKING:
    from .potential import Potential

__all__ = ["Chains"]


class Chains:
    """``K`` independent runs of a sampler, as chains.

    Example::

        chains = Chains(DiffusionSampler, model, num_chains=4)   # or SMCSampler, SCLDSampler
        chains.run(data)
        samples = chains.get_samples(1000, group_by_chain=True)  # site -> (4, 1000, *shape)
        chains.summary()                                          # weighted moments and R-hat
        log_z, stderr, lower_bound, ess = chains.log_evidence()   # stderr from the runs' spread
        idata = pyro_sde.to_inference_data(chains)                # 4 chains for ArviZ

    :param sampler_class: the sampler, e.g. :class:`~pyro_sde.infer.DiffusionSampler`, or any callable
        returning a fresh sampler from ``(model, **sampler_options)``.
    :param model: the Pyro model (or ``None`` with ``log_density=...`` in the options).
    :param int num_chains: ``K >= 2`` runs.
    :param int seed: the chains' seeds are drawn from it (default: from torch's global generator), so
        that chain ``k`` runs under its own ``torch.manual_seed``.
    :param sampler_options: keyword arguments of every chain's sampler.
    """

    def __init__(self, sampler_class: Callable, model: Callable | None = None, *, num_chains: int = 4,
                 seed: int | None = None, **sampler_options):
        self.num_chains = positive_int(num_chains, "num_chains", minimum=2)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        seeds = torch.randint(0, 2**62, (num_chains,), generator=generator).tolist()
        self.seeds: list[int] = seeds
        with torch.random.fork_rng(devices=[]):
            self.chains = []
            for s in seeds:
                torch.manual_seed(s)  # a preconditioner fit at construction draws from it too
                self.chains.append(sampler_class(model, **sampler_options))
        self.model = model

    @property
    def _model_call(self):
        return self.chains[0]._model_call

    @property
    def potential(self) -> Potential | None:
        return self.chains[0].potential

    def run(self, *args, **kwargs) -> Chains:
        """Run every chain in turn with the model's ``args`` / ``kwargs`` (and the sampler's run options),
        chain ``k`` under ``torch.manual_seed(seeds[k])``; the global random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            for chain, s in zip(self.chains, self.seeds):
                torch.manual_seed(s)
                chain.run(*args, **kwargs)
        return self

    # ----------------------------------------------------------------------------------------
    # samples
    def get_weighted_samples(
        self, num_samples: int | None = None, *, group_by_chain: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(samples, log_weights)`` of every chain: site -> ``(K * N, *shape)`` and ``(K * N,)`` (float64;
        ``logmeanexp`` of all of them is :meth:`log_evidence`'s estimate when the chains have equal
        sizes), or ``(K, N, *shape)`` and ``(K, N)`` with ``group_by_chain``."""
        parts = [chain.get_weighted_samples(num_samples) for chain in self.chains]
        sizes = {lw.numel() for _, lw in parts}
        if group_by_chain and len(sizes) > 1:
            raise ValueError(f"the chains' weighted draws differ in size ({sorted(sizes)}): not groupable")
        join = torch.stack if group_by_chain else torch.cat
        samples = {name: join([s[name] for s, _ in parts]) for name in parts[0][0]}
        return samples, join([lw for _, lw in parts])

    def get_samples(self, num_samples: int = 1000, *, group_by_chain: bool = False, **options) -> dict:
        """Posterior draws of every chain (each chain's ``get_samples(num_samples)``): site ->
        ``(K * num_samples, *shape)``, or ``(K, num_samples, *shape)`` with ``group_by_chain``."""
        parts = [chain.get_samples(num_samples, **options) for chain in self.chains]
        join = torch.stack if group_by_chain else torch.cat
        return {name: join([p[name] for p in parts]) for name in parts[0]}

    # ----------------------------------------------------------------------------------------
    # estimates
    def log_evidence(self) -> diagnostics.LogEvidence:
        """``(log_z, stderr, lower_bound, ess)``: ``log mean_k Z_k`` with the standard error of the runs'
        spread (delta method), the mean of the runs' ``log Z_k`` (``<= log Z`` in expectation) and the
        normalised ESS of all the weights; ``pareto_k``: the largest of the runs'."""
        runs = [chain.log_evidence() for chain in self.chains]
        log_zs = torch.stack([torch.as_tensor(r.log_z, dtype=torch.float64) for r in runs])
        z = (log_zs - log_zs.max()).exp()
        log_z = log_zs.logsumexp(0) - math.log(self.num_chains)
        stderr = z.std() / (z.mean() * math.sqrt(self.num_chains))
        log_w = self._log_weights()
        return diagnostics.LogEvidence(
            log_z, stderr, log_zs.mean(), diagnostics._log_ess(log_w.double()).exp(),
            pareto_k=max(float(r.pareto_k) for r in runs),
        )

    def _chain_log_weights(self) -> list[torch.Tensor]:
        """Each chain's log weights behind its estimates (no draws constrained)."""
        return [chain._evidence_weights() for chain in self.chains]

    def _log_weights(self) -> torch.Tensor:
        return torch.cat(self._chain_log_weights())

    def run_log_evidence(self) -> torch.Tensor:
        """``log Z_k`` of each chain (K,), float64."""
        return torch.stack([torch.as_tensor(c.log_evidence().log_z).double() for c in self.chains])

    def r_hat(self, num_samples: int = 1000) -> dict:
        """Split R-hat of each site element over the chains' ``num_samples`` resampled draws (Pyro's
        ``split_gelman_rubin``): site -> tensor of the site's shape. Near 1 when the runs agree."""
        draws = self.get_samples(num_samples, group_by_chain=True)
        return {n: split_gelman_rubin(v.double(), chain_dim=0, sample_dim=1) for n, v in draws.items()}

    def effective_sample_size(self) -> dict:
        """Per-site ESS of the chains' draws, never above the importance ESS: each chain's draws are
        resampled to about its own importance ESS ``N_k ESS_k`` and Pyro's ``effective_sample_size``
        (autocorrelation across the chains' draws) is capped by ``sum_k N_k ESS_k``."""
        weights = self._chain_log_weights()
        effective = [float(diagnostics.effective_sample_size(w)) * w.numel() for w in weights]
        size = max(int(min(effective)), 4)
        draws = self.get_samples(size, group_by_chain=True, new=True)
        cap = torch.tensor(sum(effective), dtype=torch.float64)
        return {n: effective_sample_size(v.double(), chain_dim=0, sample_dim=1).clamp(max=cap)
                for n, v in draws.items()}

    def get_summary(self, prob: float = 0.9) -> dict:
        """Weighted summary of all the chains' draws, with ``"n_eff"`` (:meth:`effective_sample_size`)
        and ``"r_hat"`` per site element."""
        samples, log_w = self.get_weighted_samples()
        summary = diagnostics.weighted_summary(samples, log_w, prob=prob)
        n_eff, r_hat = self.effective_sample_size(), self.r_hat()
        for name in summary:
            if name in r_hat:
                summary[name]["n_eff"] = n_eff[name]
                summary[name]["r_hat"] = r_hat[name]
        return summary

    def summary(self, prob: float = 0.9) -> None:
        """Print :meth:`get_summary` (with R-hat) and the combined evidence."""
        diagnostics.print_weighted_summary(self.get_summary(prob), self.log_evidence())

    def diagnostics(self) -> dict:
        """The combined evidence, each chain's, and the largest R-hat."""
        ev = self.log_evidence()
        worst = max(float(v.max()) for v in self.r_hat().values())
        return {
            "log_evidence": float(ev.log_z),
            "log_evidence_stderr": float(ev.stderr),
            "log_evidence_lower_bound": float(ev.lower_bound),
            "run_log_evidence": self.run_log_evidence().tolist(),
            "ess": float(ev.ess),
            "pareto_k": ev.pareto_k,
            "reliable": ev.reliable,
            "num_chains": self.num_chains,
            "max_r_hat": worst,
        }

    def __repr__(self):
        return f"Chains({type(self.chains[0]).__name__}, num_chains={self.num_chains})"
