"""Short text for one-line messages."""
from typing import Sequence


def first_few(items: Sequence[str], most: int = 3) -> str:
    """The first `most` items, comma-separated, and ", ..." when there are more."""
    return ", ".join(items[:most]) + (", ..." if len(items) > most else "")
