"""Where checkpoint files come from: a local directory, or a Hugging Face repo id through the local cache (downloaded
only when online). One resolver for the model's files (bark.loading), the tokenizer and the voice presets
(bark.processor) and the CLI's choice of model; an unreachable Hub is found by one short probe per minute, reported
as such at once, never as a missing file.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

__all__ = ["Source", "resolve_checkpoint", "hub_unreachable_reason", "hub_unreachable", "hub_cached",
           "HUB_PROBE_TIMEOUT_S"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_HUB_PROBE: dict[str, tuple[float, str | None]] = {}  # endpoint -> (time, reason): one probe per minute at most


class Source:
    """Where checkpoint files come from: a local directory or a hub repo (cache first)."""

    def __init__(self, name: str, find: Callable[[str], str | None], where: str, hint: str = "") -> None:
        self.name = name
        self.find = find  # filename -> local path or None when the checkpoint has no such file
        self.where = where
        self.hint = hint  # appended to "file is missing" errors


def _local_source(path: str) -> Source:
    def find(filename: str) -> str | None:
        full = os.path.join(path, filename)
        return full if os.path.isfile(full) else None

    return Source(path, find, f"directory {path}")


HUB_PROBE_TIMEOUT_S = 5.0


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hugging Face Hub endpoint answers (any HTTP status), else why not, in one line.

    One request with a short timeout and no retries, through huggingface_hub's own HTTP client (its proxy and
    certificate settings): without it, a download from an unreachable Hub retries for ~25 s and then reports the file
    as missing from the cache."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:  # pragma: no cover - an old huggingface_hub: let the download itself fail
        return None
    endpoint = constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as error:  # connection refused, DNS failure, timeout, proxy error...
        text = " ".join(str(error).split()) or "no answer"
        return f"{endpoint} cannot be reached ({type(error).__name__}: {text})"
    return None


def _hub_source(repo_id: str, revision: str | None = None) -> Source:
    try:
        import huggingface_hub
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        from huggingface_hub.file_download import _CACHED_NO_EXIST
    except ImportError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and huggingface_hub (needed to resolve a repo id) is not "
            f"installed ({error}); pass the path of a checkpoint directory or `pip install huggingface_hub`"
        ) from None

    offline = bool(constants.HF_HUB_OFFLINE)
    todo = (f"On a machine with internet run `hf download {repo_id}` (then copy the cache, or point HF_HOME at it), "
            f"or pass the path of a local checkpoint directory.")

    def unreachable(filename: str, why: str) -> ConnectionError:
        return ConnectionError(f"{repo_id!r} is not a local directory and {filename} is not in the Hugging Face "
                               f"cache ({constants.HF_HUB_CACHE}); the Hugging Face Hub is unreachable: {why}. {todo}")

    def find(filename: str) -> str | None:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):
            return cached
        if cached is _CACHED_NO_EXIST:
            return None
        if offline:
            return None
        why = hub_unreachable()
        if why is not None:
            raise unreachable(filename, why)
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision)
        except LocalEntryNotFoundError as error:  # a subclass of EntryNotFoundError: the network, not the file
            raise unreachable(filename, " ".join(str(error).split())) from None
        except EntryNotFoundError:
            return None
        except Exception as error:  # unknown repo, gated, server error...
            text = " ".join(str(error).split())
            raise FileNotFoundError(
                f"{repo_id!r} is not a local directory and {filename} is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); downloading it failed: {type(error).__name__}: {text}. {todo}"
            ) from None

    where = f"Hugging Face repo {repo_id} (cache {constants.HF_HUB_CACHE}{', offline' if offline else ''})"
    hint = ""
    if offline:
        hint = (f"; it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so nothing can be "
                f"downloaded: on a machine with internet run `hf download {repo_id}` and copy the cache here (or point "
                f"HF_HOME at it), unset HF_HUB_OFFLINE to download, or pass the path of a local checkpoint directory")
    return Source(repo_id, find, where, hint)


def resolve_checkpoint(path_or_repo_id, revision: str | None = None) -> Source:
    if isinstance(path_or_repo_id, os.PathLike):
        path_or_repo_id = os.fspath(path_or_repo_id)
    if not isinstance(path_or_repo_id, str) or not path_or_repo_id:
        raise TypeError(f"path_or_repo_id: expected a directory path or a Hugging Face repo id (str), "
                        f"got {path_or_repo_id!r}")
    if os.path.isdir(path_or_repo_id):
        return _local_source(path_or_repo_id)
    if os.path.exists(path_or_repo_id):
        raise FileNotFoundError(f"path_or_repo_id: {path_or_repo_id} is a file; expected a checkpoint directory "
                                f"holding config.json and the weights")
    if not _REPO_ID.fullmatch(path_or_repo_id):
        raise FileNotFoundError(f"path_or_repo_id: directory {path_or_repo_id} does not exist (and it is not a "
                                f"Hugging Face repo id of the form 'owner/name')")
    return _hub_source(path_or_repo_id, revision)


def hub_unreachable() -> str | None:
    """:func:`hub_unreachable_reason`, asked at most once a minute per endpoint."""
    from huggingface_hub import constants

    now = time.monotonic()
    hit = _HUB_PROBE.get(constants.ENDPOINT)
    if hit is None or now - hit[0] > 60:
        hit = (now, hub_unreachable_reason())
        _HUB_PROBE[constants.ENDPOINT] = hit
    return hit[1]


def hub_cached(repo_id: str) -> bool:
    """True when repo_id's config.json is in the local Hugging Face cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed cache must not stop the random-model fallback
        return False
