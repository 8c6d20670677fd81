"""CLI subcommands of the downstream adapters (finetune, predict, evaluate, demo).

``register(add)`` is called by ``brainmm.cli.build_parser``; ``add(name, fn, help) -> argparse.ArgumentParser``.
Handlers import their heavy modules lazily so that ``brainmm --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def register(add: Callable[..., Any]) -> None:
    """Add the adapter subcommands to the ``brainmm`` parser."""
