"""Progress bars for long work (training, evaluation, rendering and decoding datasets): tqdm on
stderr, left out when stderr is not a terminal (disable=None), so logs stay clean."""
from typing import Optional


def progress_bar(total: int, description: str, enabled: bool = True, initial: int = 0,
                 unit: str = "it"):
    """A tqdm bar, or None when not `enabled`."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=description, unit=unit, leave=False,
                disable=None, dynamic_ncols=True)


def close(bar: Optional[object]) -> None:
    if bar is not None:
        bar.close()
