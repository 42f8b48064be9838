"""``argparse`` value types shared by the ``ingest`` command and the adapters' ``add_arguments``."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def positive_int_at_most(limit: int):
    """A ``positive_int`` type that also refuses values above ``limit``."""

    def parse(text: str) -> int:
        v = positive_int(text)
        if v > limit:
            raise argparse.ArgumentTypeError(f"expected a positive integer of at most {limit}, got {v}")
        return v

    return parse
