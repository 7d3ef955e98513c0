"""Models from the Hugging Face hub, pinned to a revision, with one-line errors.

Every ``from_pretrained`` of a hub model goes through ``load``: a hub id is
fetched at the revision its param names (a commit hash pins the exact files;
the presets pin one per model), through the usual Hugging Face cache, so
``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` behave as users expect.
A local directory is loaded as it is (no revision).

What goes wrong is one line that names the param and what to do:

- the model is not in the cache and the hub cannot be reached (an offline
  machine, or ``HF_HUB_OFFLINE=1``): where the cache is and how to fill it;
- the hub has no such model, or no such revision of it.

When the hub host does not resolve, the load runs with ``local_files_only``
at once instead of letting huggingface_hub retry for ~25 s.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vlmpipe.core.errors import UserError

log = logging.getLogger(__name__)

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_local(name: str | os.PathLike) -> bool:
    """A directory on disk (loaded as is), as opposed to a hub id."""
    return Path(name).is_dir()


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def host_reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when ``url``'s host accepts a TCP connection, else the reason (name not known, refused, ...)."""
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{u.hostname}: {e.strerror or e}"


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (``HF_HUB_OFFLINE`` set, or its host does not answer), or None."""
    from huggingface_hub import constants

    if offline_mode():
        return "HF_HUB_OFFLINE=1"
    return host_reachable(constants.ENDPOINT)


def is_cached(name: str, revision: str) -> bool:
    """The model's config at ``revision`` is in the local cache (a branch counts when its ref is there)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except Exception:  # noqa: BLE001 - an invalid id or revision is simply not cached
        return False


def fetch_hint(name: str, revision: str) -> str:
    return (f"on a machine with internet run `hf download {name} --revision {revision}` and copy "
            f"{cache_dir()}/models--{name.replace('/', '--')} here (or set HF_HUB_CACHE), "
            "or point the param at a local folder")


def load(loader: Any, name: str | os.PathLike, revision: str, key: str, **kwargs) -> Any:
    """``loader.from_pretrained(name, revision=...)``; every failure is one ``UserError`` naming ``key``.

    ``loader``: a transformers class (``AutoModelForCausalLM``, ``AutoTokenizer``, ...).
    """
    name = str(name)
    if is_local(name):
        try:
            return loader.from_pretrained(name, **kwargs)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged folder fails in many ways (JSON, safetensors, shapes)
            raise UserError(f"{key}: cannot load {name} ({type(e).__name__}: {_first_line(e)})") from None
    cached = is_cached(name, revision)
    # A cached commit needs no network; a branch asks the hub where it points now.
    why_offline = None if cached and COMMIT.match(revision) else hub_unreachable()
    if why_offline and not cached:
        # Not cached and no way to fetch it: say so now, not after huggingface_hub's retries.
        raise UserError(f"{key}: {name}@{revision} is not in the Hugging Face cache ({cache_dir()}) and the hub "
                        f"cannot be reached ({why_offline}); {fetch_hint(name, revision)}")
    if why_offline:
        kwargs["local_files_only"] = True  # the cached files, without ~25 s of retries first
    try:
        return loader.from_pretrained(name, revision=revision, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - network, cache and file problems surface as many types
        raise UserError(f"{key}: {describe(e, name, revision)}") from None


def describe(e: BaseException, name: str, revision: str) -> str:
    """One line for a failed hub load, from the huggingface_hub error behind transformers' OSError."""
    from huggingface_hub import errors

    chain, c = [], e
    while c is not None and len(chain) < 10:
        chain.append(c)
        c = c.__cause__ or c.__context__
    kinds = tuple(type(c) for c in chain)
    if any(issubclass(k, errors.RevisionNotFoundError) for k in kinds):
        return f"{name} has no revision {revision!r} on the hub"
    if any(issubclass(k, errors.GatedRepoError) for k in kinds):
        return f"{name} is gated: accept its licence on the hub and set HF_TOKEN"
    if any(issubclass(k, errors.RepositoryNotFoundError) for k in kinds):
        return f"{name} is not a model on the hub (or is private: set HF_TOKEN)"
    if any(issubclass(k, errors.LocalEntryNotFoundError) for k in kinds):
        return (f"{name}@{revision} is not (completely) in the Hugging Face cache ({cache_dir()}) and could not be "
                f"downloaded; {fetch_hint(name, revision)}")
    return f"cannot load {name}@{revision} ({_first_line(e)})"


def resolved_commit(name: str | os.PathLike, revision: str) -> str | None:
    """The commit ``revision`` of hub model ``name`` resolves to in the local cache (after a load:
    the commit that was loaded); None for a local folder or when nothing is cached."""
    from huggingface_hub import try_to_load_from_cache

    if is_local(name):
        return None
    try:
        path = try_to_load_from_cache(str(name), "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an invalid id or revision resolves to nothing
        return None
    parts = Path(path).parts if isinstance(path, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def warn_unpinned(name: str, revision: str, key: str) -> None:
    """A branch such as ``main`` follows the hub: the same params may load other weights tomorrow."""
    if not is_local(name) and not COMMIT.match(revision):
        log.warning("%s: %s follows %s@%s, which the hub may change; pin a 40-hex commit hash for "
                    "reproducible runs", key, name, name, revision)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
