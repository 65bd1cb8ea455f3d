"""`kubellm fetch-model REPO_ID --dest DIR`: fetch a checkpoint from a Hugging Face hub.

The operator runs it as the init container behind `spec.model.huggingFace`; the server then
serves the directory. Only the files a server needs are fetched (safetensors weights, config,
tokenizer, chat template), never pickle weights. The files go straight to DIR through
huggingface_hub's `local_dir` machinery, so an interrupted fetch resumes.

DIR/.kubellm-model.json records what was fetched (repo id, revision asked for, resolved commit,
files with sizes). A re-run for the same repo id and revision whose files are all present makes no
network call at all: an init container runs again after a pod restart, and the hub may be down.

Errors the user can act on (not found, no access, hub unreachable, disk full) become one line
(`FetchError`) and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import disable_progress_bars, validate_repo_id

logger = logging.getLogger(__name__)

MARKER = ".kubellm-model.json"
MARKER_FORMAT = 1
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_INCLUDE = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "*.jinja",
)
CONFIG_ONLY_INCLUDE = tuple(p for p in DEFAULT_INCLUDE if ".safetensors" not in p)
"""--config-only: what an API server reads (config, tokenizer, chat template), no weights."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"
MAX_WORKERS = 4
API_TIMEOUT_S = 30.0
_IGNORED_ENTRIES = frozenset({"lost+found"})
_TRUE = frozenset({"1", "true", "yes", "on"})


class FetchError(Exception):
    """A failure the user can act on: one line on stderr, exit code 1, no traceback."""


class FetchArgumentError(ValueError):
    """A bad argument (exit code 2)."""


@dataclass(frozen=True)
class FetchRequest:
    repo_id: str
    revision: str
    dest: Path
    endpoint: str
    token: str | None = field(default=None, repr=False)
    include: tuple[str, ...] = ()
    force: bool = False
    offline: bool = False
    config_only: bool = False


@dataclass(frozen=True)
class Marker:
    """The content of DEST/.kubellm-model.json."""

    repo_id: str
    revision: str
    sha: str | None
    files: dict[str, int]
    complete: bool
    include: tuple[str, ...] = ()
    """The --include patterns of the fetch (empty: the default set)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MARKER_FORMAT,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "sha": self.sha,
            "complete": self.complete,
            "include": list(self.include),
            "files": dict(sorted(self.files.items())),
        }


# ---- arguments -----------------------------------------------------------------------------


def request_from_args(
    repo_id: str,
    *,
    revision: str,
    dest: str,
    token_file: str | None,
    include: Sequence[str] | None,
    force: bool,
    environ: Mapping[str, str],
    config_only: bool = False,
) -> FetchRequest:
    """Validate the arguments once; raises FetchArgumentError with a message naming the flag."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise FetchArgumentError(f"REPO_ID {repo_id!r} is not a valid hub repo id: {e}") from e
    if not revision.strip():
        raise FetchArgumentError("--revision must not be empty")
    if not dest.strip():
        raise FetchArgumentError("--dest must not be empty")
    patterns = tuple(include or ())
    if any(not p.strip() for p in patterns):
        raise FetchArgumentError("--include patterns must not be empty")
    if config_only and patterns:
        raise FetchArgumentError("--config-only and --include are mutually exclusive")
    return FetchRequest(
        repo_id=repo_id,
        revision=revision,
        dest=Path(dest).expanduser(),
        endpoint=(environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        token=read_token(token_file, environ),
        include=CONFIG_ONLY_INCLUDE if config_only else patterns,
        force=force,
        config_only=config_only,
        offline=environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE,
    )


def read_token(token_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The token from --token-file (surrounding whitespace stripped), else $HF_TOKEN, else None."""
    if token_file is None:
        return environ.get("HF_TOKEN", "").strip() or None
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise FetchArgumentError(f"cannot read --token-file {token_file}: {reason}") from e
    if not token:
        raise FetchArgumentError(f"--token-file {token_file} is empty")
    return token


# ---- the command ---------------------------------------------------------------------------


def run_fetch(request: FetchRequest) -> int:
    """Fetch, and turn a FetchError into one line on stderr and exit code 1."""
    for name in ("httpx", "httpx2"):  # one INFO line per HTTP request is too much
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        fetch_model(request)
    except FetchError as e:
        sys.stderr.write(f"kubellm fetch-model: error: {e}\n")
        return 1
    return 0


def fetch_model(request: FetchRequest) -> Marker:
    """Make DEST hold the checkpoint; returns the marker written (or found)."""
    dest = _prepare_dest(request.dest)
    found = read_marker(dest)
    if found is not None and _satisfies(found, request, dest):
        logger.info(
            "already fetched %s at %s (commit %s, %d files) in %s; no network call made",
            request.repo_id,
            request.revision,
            found.sha,
            len(found.files),
            dest,
        )
        return found
    _check_dest_owner(dest, found, request)
    if request.offline:
        raise FetchError(
            f"HF_HUB_OFFLINE is set and {dest} holds no complete fetch of {request.repo_id} "
            f"at revision {request.revision}: unset HF_HUB_OFFLINE, or put the model on a PVC"
        )
    try:
        return _fetch_online(request, dest, found)
    except FetchError:
        raise
    except Exception as e:
        explained = explain_error(e, request)
        if explained is None:
            raise
        raise explained from e


def _fetch_online(request: FetchRequest, dest: Path, previous: Marker | None) -> Marker:
    started = time.monotonic()
    disable_progress_bars()  # log lines, not progress bars, in a container's log
    api = HfApi(endpoint=request.endpoint, token=_token_arg(request))
    sha, listing = _resolve(api, request)
    selected = select_files(listing, request.include)
    _check_checkpoint(request, set(selected), listing)
    if previous is not None:
        _remove_stale(dest, previous, set(selected))
    started_marker = Marker(request.repo_id, request.revision, sha, {}, False, request.include)
    write_marker(dest, started_marker)
    indexes = [n for n in selected if n.endswith(INDEX_SUFFIX)]
    fetched = _download_all(request, dest, sha, indexes, listing)
    if not request.include:
        selected = _drop_unindexed_shards(dest, selected, indexes)
    rest = [n for n in selected if n not in indexes]
    _check_space(dest, {name: listing[name] for name in rest})
    fetched += _download_all(request, dest, sha, rest, listing)
    _check_on_disk(request, dest)
    files = {name: (dest / name).stat().st_size for name in selected}
    marker = Marker(request.repo_id, request.revision, sha, files, True, request.include)
    write_marker(dest, marker)
    logger.info(
        "fetched %s at %s (commit %s) into %s: %d files, %s downloaded, %.1f s",
        request.repo_id,
        request.revision,
        sha,
        dest,
        len(files),
        human_bytes(fetched),
        time.monotonic() - started,
    )
    return marker


def _token_arg(request: FetchRequest) -> str | bool:
    """A string token, or False: never fall back on a token stored under HF_HOME."""
    return request.token if request.token is not None else False


def _resolve(api: HfApi, request: FetchRequest) -> tuple[str, dict[str, int]]:
    """The commit sha the revision points at, and the repo's files with their sizes."""
    info = api.model_info(
        request.repo_id, revision=request.revision, files_metadata=True, timeout=API_TIMEOUT_S
    )
    if not info.sha:
        raise FetchError(f"{request.endpoint} returned no commit for {request.repo_id}")
    listing = {s.rfilename: int(s.size or 0) for s in info.siblings or ()}
    logger.info(
        "%s at %s is commit %s on %s (%d files in the repo)",
        request.repo_id,
        request.revision,
        info.sha,
        request.endpoint,
        len(listing),
    )
    return info.sha, listing


# ---- which files -----------------------------------------------------------------------------


def select_files(listing: Mapping[str, int], include: Sequence[str]) -> list[str]:
    """The files to fetch, sorted. By default the top-level files a server reads, never pickles;
    `include` patterns (fnmatch on the path in the repo) replace the default."""
    if include:
        return sorted(name for name in listing if any(fnmatchcase(name, p) for p in include))
    return sorted(
        name
        for name in listing
        if "/" not in name
        and not name.endswith(PICKLE_SUFFIXES)
        and any(fnmatchcase(name, p) for p in DEFAULT_INCLUDE)
    )


def _check_checkpoint(
    request: FetchRequest, selected: set[str], listing: Mapping[str, int]
) -> None:
    """Fail before downloading anything when the selection cannot be a usable checkpoint."""
    missing = _missing_parts(selected, weights=not request.config_only)
    if not missing:
        return
    pickles = sorted(name for name in listing if name.endswith(PICKLE_SUFFIXES))
    hint = (
        f"; the repo has only pickle weights ({', '.join(pickles[:3])}), which kubellm never loads"
        if "*.safetensors" in missing and pickles
        else ""
    )
    raise FetchError(
        f"{request.repo_id} at revision {request.revision}: the files to fetch have no "
        f"{' and no '.join(missing)}{hint}"
    )


def _missing_parts(names: set[str], *, weights: bool) -> list[str]:
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if weights and not any(n.endswith(".safetensors") and "/" not in n for n in names):
        missing.append("*.safetensors")
    return missing


def _check_on_disk(request: FetchRequest, dest: Path) -> None:
    present = {p.name for p in dest.iterdir() if p.is_file()}
    missing = _missing_parts(present, weights=not request.config_only)
    if missing:
        raise FetchError(
            f"after fetching {request.repo_id}, {dest} has no {' and no '.join(missing)}"
        )


def _drop_unindexed_shards(dest: Path, selected: list[str], indexes: list[str]) -> list[str]:
    """With a `*.safetensors.index.json`, fetch only the shards its weight_map names (a repo may
    also carry e.g. a `consolidated.safetensors` duplicate of all the weights)."""
    indexed: set[str] = set()
    for name in indexes:
        indexed |= _index_files(dest / name)
    if not indexed:
        return selected
    skipped = [n for n in selected if n.endswith(".safetensors") and n not in indexed]
    if skipped:
        logger.info("skipping %s: not named by the safetensors index", ", ".join(skipped))
    return [n for n in selected if n not in skipped]


def _index_files(index: Path) -> set[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(v) for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FetchError(f"cannot read the safetensors index {index}: {e}") from e


# ---- download ------------------------------------------------------------------------------


def _download_all(
    request: FetchRequest, dest: Path, sha: str, selected: list[str], listing: Mapping[str, int]
) -> int:
    """Download `selected` (files already complete are checked locally, not fetched again);
    returns the bytes downloaded."""
    if not selected:
        return 0
    present = {n for n in selected if _has_file(dest, n, listing[n])}
    todo = [n for n in selected if n not in present]
    total = sum(listing[n] for n in todo)
    logger.info(
        "fetching %d files (%s) from %s into %s; %d already present",
        len(todo),
        human_bytes(total),
        request.endpoint,
        dest,
        len(present),
    )
    done = 0
    with ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="fetch") as pool:
        futures = {pool.submit(_download_one, request, dest, sha, n): n for n in selected}
        try:
            for future in as_completed(futures):
                future.result()
                name = futures[future]
                if name in todo:
                    done += listing[name]
                    logger.info(
                        "fetched %s (%s); %s of %s",
                        name,
                        human_bytes(listing[name]),
                        human_bytes(done),
                        human_bytes(total),
                    )
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return done


def _download_one(request: FetchRequest, dest: Path, sha: str, name: str) -> None:
    hf_hub_download(
        request.repo_id,
        name,
        revision=sha,
        local_dir=dest,
        cache_dir=dest / ".cache" / "huggingface" / "hub",
        endpoint=request.endpoint,
        token=_token_arg(request),
    )


def _has_file(dest: Path, name: str, size: int) -> bool:
    path = dest / name
    return path.is_file() and path.stat().st_size == size


def _check_space(dest: Path, sizes: Mapping[str, int]) -> None:
    need = sum(size for name, size in sizes.items() if not _has_file(dest, name, size))
    free = shutil.disk_usage(dest).free
    if need > free:
        raise FetchError(
            f"disk full: {dest} needs {human_bytes(need)} for the model but has "
            f"{human_bytes(free)} free (a larger volume, or --include fewer files)"
        )


# ---- the destination and its marker --------------------------------------------------------


def _prepare_dest(dest: Path) -> Path:
    if dest.exists() and not dest.is_dir():
        raise FetchError(f"--dest {dest} exists and is not a directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create --dest {dest}: {e.strerror or e}") from e
    return dest.resolve()


def read_marker(dest: Path) -> Marker | None:
    """The marker in `dest`, or None when there is none; FetchError when it is unreadable."""
    path = dest / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Marker(
            repo_id=str(data["repo_id"]),
            revision=str(data["revision"]),
            sha=None if data.get("sha") is None else str(data["sha"]),
            files={str(k): int(v) for k, v in dict(data.get("files") or {}).items()},
            complete=bool(data.get("complete")),
            include=tuple(str(p) for p in data.get("include") or ()),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FetchError(f"cannot read {path} ({e}): remove it or pass --force") from e


def write_marker(dest: Path, marker: Marker) -> None:
    """Write the marker atomically (a temporary file, then a rename)."""
    path = dest / MARKER
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(marker.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise _os_error(e, dest) from e


def _satisfies(marker: Marker, request: FetchRequest, dest: Path) -> bool:
    """The marker is complete, for this repo and revision, and all its files are present."""
    if request.force or not marker.complete:
        return False
    if (marker.repo_id, marker.revision, marker.include) != (
        request.repo_id,
        request.revision,
        request.include,
    ):
        return False
    return bool(marker.files) and all(_has_file(dest, n, s) for n, s in marker.files.items())


def _check_dest_owner(dest: Path, marker: Marker | None, request: FetchRequest) -> None:
    """Refuse to mix two models in one directory unless --force."""
    if request.force:
        return
    if marker is not None:
        if (marker.repo_id, marker.revision) != (request.repo_id, request.revision):
            raise FetchError(
                f"{dest} already holds {marker.repo_id} at revision {marker.revision}; "
                f"pass --force to replace it with {request.repo_id} at {request.revision}"
            )
        return
    others = sorted(p.name for p in dest.iterdir() if p.name not in _IGNORED_ENTRIES)
    if others:
        raise FetchError(
            f"{dest} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
            "and was not filled by kubellm fetch-model; pass --force to fetch into it anyway"
        )


def _remove_stale(dest: Path, previous: Marker, keep: set[str]) -> None:
    """Remove the files a previous fetch wrote that this one does not use (another model with
    --force, or the same model with other --include patterns)."""
    stale = sorted(set(previous.files) - keep)
    for name in stale:
        (dest / name).unlink(missing_ok=True)
    if stale:
        logger.info("removed %d files of the previous fetch: %s", len(stale), ", ".join(stale))


# ---- errors --------------------------------------------------------------------------------


def explain_error(exc: BaseException, request: FetchRequest) -> FetchError | None:
    """The one-line FetchError for a failure the user can act on, or None for a bug."""
    repo, rev, endpoint = request.repo_id, request.revision, request.endpoint
    http = _find(exc, HfHubHTTPError)
    status = _status(http) if http is not None else None
    if isinstance(http, RevisionNotFoundError) or (
        status == 404 and isinstance(http, RepositoryNotFoundError)
    ):
        return FetchError(f"no model {repo} at revision {rev} on {endpoint}")
    if isinstance(http, GatedRepoError) or status in (401, 403):
        hint = "" if request.token else "; no token was given: use --token-file or HF_TOKEN"
        return FetchError(
            f"the token cannot read {repo} (gated or private model?) on {endpoint}{hint}"
        )
    if http is not None:
        return FetchError(
            f"{endpoint} answered HTTP {status} for {repo} at revision {rev}; try again later"
        )
    network = _find_network_error(exc)
    if network is not None:
        reason = " ".join(str(network).split())  # one line, whatever the library wrote
        return FetchError(
            f"cannot reach {endpoint} ({type(network).__name__}: {reason}); point HF_ENDPOINT "
            "at a reachable hub or mirror, or, in an air-gapped cluster, put the model on a PVC "
            "(spec.model.pvc)"
        )
    if any(type(e).__name__ == "FileMetadataError" for e in _chain(exc)):
        return FetchError(
            f"{endpoint} does not answer like a Hugging Face hub (no commit or ETag header on "
            "a file): check HF_ENDPOINT and any proxy in between"
        )
    os_error = _find(exc, OSError)
    if os_error is not None:
        return _os_error(os_error, request.dest)
    return None


def _os_error(e: OSError, dest: Path) -> FetchError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FetchError(f"disk full while writing into {dest}: {e.strerror}")
    return FetchError(f"cannot write into {dest}: {e.strerror or e}")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _find(exc: BaseException, kind: type[Any]) -> Any:
    return next((e for e in _chain(exc) if isinstance(e, kind)), None)


_NETWORK_ERROR_NAMES = frozenset(
    {"TransportError", "ConnectionError", "TimeoutException", "Timeout", "TimeoutError", "gaierror"}
)


def _find_network_error(exc: BaseException) -> BaseException | None:
    """A connection or timeout error anywhere in the chain (httpx, requests or the socket
    layer; matched by class name so that no HTTP client is imported here)."""
    for e in _chain(exc):
        if any(k.__name__ in _NETWORK_ERROR_NAMES for k in type(e).__mro__):
            return e
    return None


def _status(error: HfHubHTTPError) -> int | None:
    response = getattr(error, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
