"""Is a Hugging Face hub model usable here, without waiting on the network to find out?

A backbone `path` that is not a local directory is a hub id. Loading one with no network makes
`huggingface_hub` retry five times with back-off (25-64 s) before failing; these helpers answer in
at most a few seconds: offline mode (``HF_HUB_OFFLINE=1``/``TRANSFORMERS_OFFLINE=1``) means the
local cache only, and otherwise one request without retries says whether the hub answers at all.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

_TRUE = {"1", "on", "yes", "true"}
PROBE_TIMEOUT_S = 3.0


def offline() -> bool:
    """Whether the user put the Hugging Face libraries in offline mode."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


@functools.lru_cache(maxsize=1)
def reachable() -> bool:
    """One request to the hub endpoint, no retries (answered once per process): any HTTP answer
    counts as reachable; a DNS, connection or timeout error does not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint(), timeout=PROBE_TIMEOUT_S)
    except Exception:  # any transport failure means "not reachable"; nothing else to tell
        return False
    return True


def cached(repo_id: str, filename: str = "config.json") -> Path | None:
    """The locally cached `filename` of hub model `repo_id`, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id the hub would reject (bad characters): not cached
        return None
    return Path(found) if isinstance(found, str) else None


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def local_only(repo_id: str) -> bool:
    """Whether loading `repo_id` must use the local cache only: offline mode, or a hub that does
    not answer (then a load fails at once instead of retrying)."""
    return offline() or not reachable()


def unavailable(repo_id: str) -> str | None:
    """Why hub model `repo_id` cannot be loaded here — not cached and the hub offline or not
    answering — or None when it is cached or can be downloaded. The text names the fix."""
    if cached(repo_id) is not None:
        return None
    if offline():
        why = "offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)"
    elif not reachable():
        why = f"the hub ({endpoint()}) does not answer"
    else:
        return None
    return (
        f"'{repo_id}' is not a local directory, so it is a Hugging Face hub id; it is not in the "
        f"local cache ({cache_dir()}) and {why}. Download it where there is network "
        f"(`hf download {repo_id}`, then copy the cache or set HF_HOME), or point the path at a "
        "local model directory"
    )
