"""Progress of a long compile: stages (capture, each pass, codegen per kernel) on a tqdm bar when
stderr is a terminal; silent otherwise (logs, CI, pipes get no control characters)."""
from __future__ import annotations

import sys


def interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Progress:
    """``stage(name)`` names the step now running; ``close()`` clears the bar."""

    def __init__(self, label: str) -> None:
        self.bar = None
        if interactive():
            from tqdm import tqdm

            # a compile has tens of stages, each worth seeing: no refresh rate limit
            self.bar = tqdm(desc=f"turbofx: {label}", unit="step", leave=False, file=sys.stderr, mininterval=0,
                            bar_format="{desc} [{n_fmt} steps, {elapsed}]{postfix}")

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def stage(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
