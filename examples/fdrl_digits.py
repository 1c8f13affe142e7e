"""FDRL on scikit-learn's 8x8 digits (ships with scikit-learn, no download): train, sample, save grids.

    OMP_NUM_THREADS=1 python examples/fdrl_digits.py [--iterations 10000] [--out fdrl_digits.png] [--smoke]

Trains :class:`~pyro_sde.ratio.fdrl.FlowGuidedGenerator` (LSIF-chi2, data-dependent Gaussian prior) for
``--iterations`` steps (10000: about 6-7 CPU minutes at one thread; the settings of ``benchmarks/fdrl.py``),
then saves

* ``--out``: 100 unconditional samples (flow from the data-dependent prior);
* ``<out>_conditional.png``: one row per class, drawn by composing the ratio with a logistic-regression
  classifier's log-probabilities, ``r(x | y) = r(x) / (C p(y | x))`` (the paper's Eq. 12);

and shows the trained model as a Pyro sample site (``FDRLDistribution``). ``--smoke`` (CI): 100 iterations,
the pictures are noise-like, the checks are that it runs end to end and conditions on the labels. Prints
``check ...: OK`` lines and exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from pyro_sde.ratio.fdrl import FlowGuidedGenerator  # noqa: E402
from pyro_sde.ratio.fdrl_distribution import FDRLDistribution  # noqa: E402


def grid(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``(n, 64)`` images in [0, 1] -> one ``(9 rows + 1, 9 cols + 1)`` picture (dark digits on white)."""
    cols = math.ceil(x.shape[0] / rows)
    out = torch.ones(rows * 9 + 1, cols * 9 + 1)
    for k in range(x.shape[0]):
        r, c = divmod(k, cols)
        out[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c] = 1 - x[k].reshape(8, 8)
    return out


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression ``x (N, 64) -> (N, 10)`` logits (L2-regularised, full batch)."""
    clf = torch.nn.Linear(64, 10)
    opt = torch.optim.Adam(clf.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(clf(x), y) + 1e-3 * clf.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.requires_grad_(False)


def check(name: str, ok: bool, failures: list) -> None:
    print(f"check {name}: {'OK' if ok else 'FAILED'}")
    if not ok:
        failures.append(name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=10000)
    ap.add_argument("--out", default="fdrl_digits.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="100 iterations (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.iterations = 100
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64), pixels in [0, 1]
    y = torch.as_tensor(digits.target)

    gen = FlowGuidedGenerator(64, loss="lsif", num_flow_steps=30, num_refine_steps=20, step_size=0.3,
                              noise_std=0.01, hidden_dim=256, num_layers=3)
    gen.fit(x, num_iterations=args.iterations, batch_size=128, progress_bar=not args.smoke)
    samples = gen.sample(100).clamp(0, 1)
    plt.imsave(args.out, grid(samples, 10).numpy(), cmap="gray", vmin=0, vmax=1)

    clf = train_classifier(x, y)
    accuracy = (clf(x).argmax(-1) == y).float().mean()
    print(f"classifier train accuracy {accuracy:.3f}")
    labels = torch.arange(10).repeat_interleave(10)
    cond = gen.sample(100, classifier=clf, label=labels).clamp(0, 1)
    hit = (clf(cond).argmax(-1) == labels).float().mean()
    print(f"conditional samples classified as requested: {hit:.2f}")
    stem = args.out[:-4] if args.out.endswith(".png") else args.out
    plt.imsave(f"{stem}_conditional.png", grid(cond, 10).numpy(), cmap="gray", vmin=0, vmax=1)

    def model():  # the trained generator as a Pyro sample site
        with pyro.plate("images", 4):
            return pyro.sample("x", FDRLDistribution(gen))

    shape = tuple(model().shape)
    print("pyro.sample shape:", shape)
    print(f"wrote {args.out} and {stem}_conditional.png")
    failures = []
    check("classifier train accuracy above 0.9", accuracy > 0.9, failures)
    # chance is 0.1: the classifier's guidance must show even after a short training
    check(f"conditional samples classified as requested ({hit:.2f}) above 0.5", hit > 0.5, failures)
    check("FDRLDistribution site of shape (4, 64)", shape == (4, 64), failures)
    check("samples finite", bool(torch.isfinite(samples).all() and torch.isfinite(cond).all()), failures)
    if failures:
        sys.exit(f"failed checks: {failures}")


if __name__ == "__main__":
    main()
