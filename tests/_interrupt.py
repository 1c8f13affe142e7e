"""A log density that stands for Ctrl-C in kill-and-resume tests."""


class Interrupting:
    """``log_density`` that counts its calls and raises ``KeyboardInterrupt`` at the ``stop_at``-th one."""

    def __init__(self, log_density, stop_at=None):
        self.log_density, self.calls, self.stop_at = log_density, 0, stop_at

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.log_density(x)
