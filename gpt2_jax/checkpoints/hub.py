"""Fetch a GPT-2 checkpoint from the Hugging Face hub into its cache, downloading only the files needed.

:func:`download_checkpoint` resolves a hub id (bare ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` and
``distilgpt2`` are the legacy names of ``openai-community/...`` and ``distilbert/distilgpt2``) at a ``revision``
(branch, tag or commit; default ``main``) with ``huggingface_hub.hf_hub_download``, so the standard cache
(``HF_HOME`` / ``HF_HUB_CACHE``), ``HF_ENDPOINT``, ``HF_TOKEN`` and its tqdm download bars all apply. It fetches:

1. ``config.json`` at ``revision``; the snapshot's commit then pins every other file, so all files come from
   one commit even if the branch moves meanwhile;
2. the first weights file the repository has, in the order ``model.safetensors``,
   ``model.safetensors.index.json`` (+ the shards it names), ``pytorch_model.bin``, ``pytorch_model.bin.index.json``
   (+ shards), ``flax_model.msgpack`` -- never the others (``tf_model.h5``, ``rust_model.ot``, ONNX ...);
3. ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` when the repository has them.

The network is needed once; afterwards the files are read from the cache. Without network (a failed connection,
``local_files_only=True`` or ``HF_HUB_OFFLINE=1``) the cached snapshot of ``revision`` is used, and when there is
none a :class:`HubUnavailableError` says so. A probe of ``config.json`` with no retries decides between online and
offline first, so an unreachable hub fails in about a second instead of huggingface_hub's retry back-off.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from .formats import (
    CONFIG_NAME,
    FLAX_NAME,
    SAFETENSORS_INDEX_NAME,
    SAFETENSORS_NAME,
    TOKENIZER_FILES,
    TORCH_INDEX_NAME,
    TORCH_NAME,
)
from .safetensors_io import CheckpointError

# Legacy bare names the hub still redirects; resolving them here keeps the cache under the canonical repository.
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
WEIGHT_CANDIDATES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME, FLAX_NAME)
_INDEXES = (SAFETENSORS_INDEX_NAME, TORCH_INDEX_NAME)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint could be found for the given name: not a directory, not on the hub, or holds no weights."""


class HubUnavailableError(CheckpointNotFoundError):
    """The hub cannot be reached (or downloads are disabled) and the checkpoint is not in the local cache."""


def canonical_repo_id(name: str) -> str:
    """``gpt2`` -> ``openai-community/gpt2`` (and the other legacy names in :data:`HUB_ALIASES`); others as given."""
    return HUB_ALIASES.get(name, name)


def is_hub_id(name: str) -> bool:
    """True when ``name`` is syntactically a hub model id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name or name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _offline_reason(local_files_only: bool) -> str | None:
    from huggingface_hub import constants

    if local_files_only:
        return "local_files_only=True"
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    return None


def _cached(repo_id: str, filename: str, revision: str):
    """The cached path of ``filename`` at ``revision``: a Path, ``False`` if the cache knows the file does not
    exist in the repository, None if unknown."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    if found is _CACHED_NO_EXIST:
        return False
    return Path(found) if isinstance(found, str) else None


def _probe(repo_id: str, revision: str, name: str) -> Exception | None:
    """HEAD ``config.json`` once without retries: None when the hub answered, else the connection error.

    Errors that are the hub's answer (no such repository / revision / file) are raised as CheckpointErrors.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = hf_hub_url(repo_id, CONFIG_NAME, revision=revision)
    try:
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError as e:
        raise CheckpointNotFoundError(
            f"hub repository {repo_id!r} is gated: accept its terms on the hub and log in (`hf auth login` or "
            f"HF_TOKEN) ({e.response.status_code})"
        ) from None
    except RepositoryNotFoundError:
        where = f"; nor is {Path(name).resolve()} a directory" if "/" in name else ""
        raise CheckpointNotFoundError(
            f"{name!r} is not a local directory and the Hugging Face hub ({constants.ENDPOINT}) has no model "
            f"repository {repo_id!r} (or it is private: log in with `hf auth login` or set HF_TOKEN){where}"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(
            f"hub repository {repo_id!r} has no revision {revision!r} (a branch, tag or full commit hash)"
        ) from None
    except EntryNotFoundError:
        raise CheckpointNotFoundError(
            f"hub repository {repo_id!r} at {revision!r} has no {CONFIG_NAME}: not a transformers model repository"
        ) from None
    except (OfflineModeIsEnabled, *_transport_errors()) as e:
        return e
    except HfHubHTTPError as e:  # 5xx and the like: treat as unreachable, try the cache
        return e
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout error types of the HTTP client huggingface_hub uses (httpx2 in 2.x, requests before)."""
    types: list[type[BaseException]] = [OSError]
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            types.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _unavailable(name: str, repo_id: str, revision: str, reason: str) -> HubUnavailableError:
    from huggingface_hub import constants

    problem = (f"cannot download {name!r} ({reason}) and it is not in the Hugging Face cache "
               f"({constants.HF_HUB_CACHE}, repository {repo_id}, revision {revision})")
    error = HubUnavailableError(
        f"{problem}: pass a local directory with --model / as name_or_path, or run once with network access to "
        "fill the cache"
    )
    error.problem = problem  # without the advice, for callers whose flags differ (``gpt2-jax convert``: SRC)
    return error


def _download(repo_id: str, filename: str, revision: str, offline: bool):
    """``hf_hub_download`` one file: its Path, or None when the repository does not have it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    found = _cached(repo_id, filename, revision)
    if found is not None or offline:  # cached, or known not to exist at this commit, or no network to ask
        return found or None
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:
        raise
    except EntryNotFoundError:
        return None


def download_checkpoint(name: str, revision: str | None = None, local_files_only: bool = False) -> tuple[Path, str]:
    """Download (or find in the cache) the files of a hub checkpoint; ``(snapshot directory, commit hash)``.

    Args:
        name: a hub id (``gpt2``, ``openai-community/gpt2-medium``, ``user/my-gpt2``).
        revision: branch, tag or commit hash (default ``main``).
        local_files_only: never use the network, only the cache (also implied by ``HF_HUB_OFFLINE=1``).

    Returns:
        The cache's snapshot directory holding the files (a directory :func:`from_pretrained` reads) and the
        commit it is.

    Raises:
        HubUnavailableError: offline (or the hub is unreachable) and the files are not in the cache.
        CheckpointNotFoundError: the hub has no such repository, revision or ``config.json``, or the repository
            holds no weights in a format this package reads.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id = canonical_repo_id(name)
    revision = revision or "main"
    offline_reason = _offline_reason(local_files_only)
    config = _cached(repo_id, CONFIG_NAME, revision) if _COMMIT.match(revision) else None
    if config:  # a pinned commit already in the cache: nothing can have changed, skip the network
        offline_reason = offline_reason or "commit already cached"
    elif offline_reason is None:
        error = _probe(repo_id, revision, name)
        if error is not None:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            offline_reason = f"no network: {type(error).__name__}: {first_line}"
    offline = offline_reason is not None
    if offline:
        config = config or _cached(repo_id, CONFIG_NAME, revision)
        if not config:
            raise _unavailable(name, repo_id, revision, offline_reason)
    else:
        try:
            config = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision))
        except LocalEntryNotFoundError as e:  # the connection dropped after the probe
            raise _unavailable(name, repo_id, revision, f"no network: {e}") from None
    snapshot = config.parent
    commit = snapshot.name

    try:
        weights = None
        for candidate in WEIGHT_CANDIDATES:
            weights = _download(repo_id, candidate, commit, offline)
            if weights is not None:
                break
        if weights is None:
            where = "in the cache" if offline else "in the repository"
            raise CheckpointNotFoundError(
                f"hub repository {repo_id!r} at {commit[:12]} has no GPT-2 weights {where}: looked for "
                f"{', '.join(WEIGHT_CANDIDATES)}"
                + (f" ({offline_reason}; run once with network access to download them)" if offline else "")
            )
        if weights.name in _INDEXES:
            try:
                weight_map = json.loads(weights.read_text(encoding="utf-8")).get("weight_map", {})
            except (OSError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{weights}: unreadable shard index ({e})") from e
            missing = []
            for shard in dict.fromkeys(weight_map.values()):
                if _download(repo_id, str(shard), commit, offline) is None:
                    missing.append(str(shard))
            if missing:
                raise CheckpointNotFoundError(
                    f"{repo_id!r} at {commit[:12]}: {weights.name} names shards that are "
                    f"{'not in the cache' if offline else 'missing from the repository'}: {', '.join(missing)}"
                )
        for filename in TOKENIZER_FILES:
            _download(repo_id, filename, commit, offline)
    except LocalEntryNotFoundError as e:  # the connection dropped mid-way and the file is not cached
        raise _unavailable(name, repo_id, revision, f"no network: {(str(e).splitlines() or [''])[0]}") from None
    return snapshot, commit
