"""Progress bars for long work (compress, recover, eval): tqdm, with the user's ``TQDM_*``
environment variables honoured (``TQDM_DISABLE=1`` turns every bar off)."""
from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, off when ``enabled`` is false.

    When enabled, ``disable`` is left to tqdm so that ``TQDM_DISABLE`` (an explicit
    ``disable=False`` would override it) and the other ``TQDM_*`` variables apply."""
    if not enabled:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
