"""What both ends of the engine-core ZeroMQ links agree on: the start-up config, routing ids,
the compatibility check, socket options and CURVE keys.

Torch-free and free of lazy imports of torch modules, so that the API server may import it
(`kubellm.engine.core` lazily imports the model backend, which the server must never reach).
See docs/design/0003-scale-out.md for the topology.
"""

from __future__ import annotations

import hashlib
import socket
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from pydantic import BaseModel, ConfigDict, Field

from kubellm.engine.model_files import resolve_model
from kubellm.protocol.codec import DEFAULT_MAX_MESSAGE_BYTES
from kubellm.protocol.messages import PROTOCOL_VERSION, EngineCompat
from kubellm.protocol.settings import EngineSettings

INPUT_HWM = 10_000
"""High-water mark (messages) of the client → engine direction; finite, so memory is bounded."""
OUTPUT_HWM = 100_000
"""High-water mark (messages) of the engine → client direction."""
ENGINE_LINGER_MS = 3_000
"""How long an engine exiting on a failure keeps trying to deliver its last frames (EngineDead)."""
CLEAN_STOP_LINGER_MS = 500
"""The same after SIGTERM: the peers are usually stopping too, and a pod's shutdown should not
wait on sockets whose other end is already gone."""


def goodbye_linger_ms(short: bool) -> int:
    """How long to linger on a link after queueing an `EngineDead` on it: short after a clean
    stop or when the head is gone, long after a failure the head should hear about."""
    return CLEAN_STOP_LINGER_MS if short else ENGINE_LINGER_MS


HELLO_RETRY_S = 1.0
"""How often an unanswered engine repeats `EngineHello`."""

CURVE_HEAD_KEY = "head.key"
"""Public key file of the head (engines need it to dial the head)."""
CURVE_HEAD_SECRET = "head.key_secret"
"""Key pair file of the head (only the head needs it)."""
CURVE_ENGINE_KEY = "engine.key"
"""Public key file of the engines (the head accepts engines holding the matching secret)."""
CURVE_ENGINE_SECRET = "engine.key_secret"
"""Key pair file of the engines (only engines need it)."""


class EngineCoreConfig(BaseModel):
    """Everything an engine-core process needs; passed as JSON in `kubellm-engine --config-json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    settings: EngineSettings
    """The engine settings of `kubellm serve`."""
    coordinator_address: str
    """ZMQ address of the head's coordinator ROUTER; the engine registers there and learns the
    addresses of the head's API servers from the `EngineWelcome`."""
    engine_index: int = Field(default=0, ge=0, lt=2**16)
    """This engine's data-parallel rank."""
    parent_pid: int | None = None
    """The process that spawned the engine; the engine exits soon after it disappears."""
    revision: str = ""
    """The --deployment-revision; part of `EngineCompat.revision`."""
    head_timeout_s: float = Field(default=30.0, gt=0)
    """Exit non-zero when no `HeadBeat` arrived for this long after the welcome."""
    registration_timeout_s: float = Field(default=600.0, gt=0)
    """Exit non-zero when no head answered `EngineHello` within this long."""
    curve_dir: str | None = None
    """Directory with `engine.key_secret` and `head.key`: authenticate and encrypt with CURVE."""
    monitor_address: str | None = None
    """ZMQ address of a local supervisor's PULL for `EngineStatus` and `Heartbeat` (headless)."""
    drain_timeout_s: float = Field(default=0.0, ge=0)
    """0: exit at once on SIGTERM/SIGINT (local engines; the API server drains). > 0 (headless
    engines): on the first signal send `EngineDraining`, finish the requests in flight for at
    most this long, fail what is left, then exit 0; a second signal ends the drain at once."""


def engine_identity(engine_index: int, incarnation: int) -> bytes:
    """The DEALER routing id of an engine: rank (2 bytes) + incarnation (8 bytes), little endian.

    The incarnation makes a restarted engine's id differ from its predecessor's, so a ROUTER
    that still holds the old connection accepts the new one."""
    return engine_index.to_bytes(2, "little") + incarnation.to_bytes(8, "little")


def parse_engine_identity(identity: bytes) -> tuple[int, int] | None:
    """(rank, incarnation) of a routing id made by `engine_identity`; None for anything else."""
    if len(identity) != 10:
        return None
    return int.from_bytes(identity[:2], "little"), int.from_bytes(identity[2:], "little")


def kubellm_version() -> str:
    try:
        return version("kubellm-engine")
    except PackageNotFoundError:
        return "unknown"


def revision_string(deployment_revision: str = "") -> str:
    """`EngineCompat.revision`: "kubellm <version>" plus "/<deployment revision>" if given."""
    base = f"kubellm {kubellm_version()}"
    return f"{base}/{deployment_revision}" if deployment_revision else base


_DIGESTED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def model_digest(model_dir: Path) -> str:
    """sha256 over the config and tokenizer files of a model directory (not the weights)."""
    digest = hashlib.sha256()
    for name in _DIGESTED_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def engine_compat(settings: EngineSettings, deployment_revision: str = "") -> EngineCompat:
    """The compat of an engine (or head) with these settings. Resolves the model directory
    (raises ValueError when it cannot); the dummy backend without a model digests its name."""
    if settings.engine_backend == "dummy" and settings.model is None:
        digest = hashlib.sha256(b"dummy").hexdigest()[:16]
    else:
        digest = model_digest(resolve_model(settings.model))
    return EngineCompat(
        protocol_version=PROTOCOL_VERSION,
        revision=revision_string(deployment_revision),
        model_digest=digest,
        max_model_len=settings.max_model_len,
        dtype=settings.dtype,
        engine_backend=settings.engine_backend,
    )


def compat_mismatches(expected: EngineCompat, got: EngineCompat) -> list[str]:
    """Human-readable differences ("field: head X, engine Y"); empty when compatible."""
    out = []
    for field in expected.__struct_fields__:
        want, have = getattr(expected, field), getattr(got, field, None)
        if want != have:
            out.append(f"{field}: head {want!r}, engine {have!r}")
    return out


def set_socket_options(
    sock: zmq.Socket[Any],
    *,
    receives: bool,
    hwm: int,
    linger_ms: int,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> None:
    """Bound a socket (sync or asyncio): finite high-water marks, a linger, and MAXMSGSIZE
    where it receives, so that an oversized frame is refused by ZeroMQ before it is read.
    Also enables IPv6 (dual stack), which ZeroMQ needs on both the binding and the dialling end."""
    sock.setsockopt(zmq.IPV6, 1)  # both ends need it for IPv6 addresses; IPv4 still works
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if receives:
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)


# -- addresses -------------------------------------------------------------------------------


def tcp_address(host: str, port: int) -> str:
    """tcp://host:port, with IPv6 literals bracketed."""
    host = host.strip("[]")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def resolve_bind_host(host: str) -> str:
    """The IP address a head binds for `--data-parallel-address host`: the address itself, or
    what a host name resolves to. Raises ValueError when it cannot be resolved."""
    bare = host.strip("[]")
    try:
        infos = socket.getaddrinfo(bare, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--data-parallel-address {host!r} does not resolve: {e}") from None
    return str(infos[0][4][0])


# -- CURVE -----------------------------------------------------------------------------------


def _load_key(curve_dir: str, name: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(curve_dir) / name
    if not path.is_file():
        raise ValueError(f"CURVE key file {path} does not exist (see `kubellm zmq-keys`)")
    public, secret_key = zmq.auth.load_certificate(path)
    if secret and secret_key is None:
        raise ValueError(f"CURVE key file {path} holds no secret key")
    return public, secret_key


def curve_server(sock: zmq.Socket[Any], curve_dir: str) -> None:
    """Make a binding socket a CURVE server with the head's key pair. Which clients it accepts
    is decided by the ZAP authenticator (`curve_allowed_clients`)."""
    public, secret = _load_key(curve_dir, CURVE_HEAD_SECRET, secret=True)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def curve_client(sock: zmq.Socket[Any], curve_dir: str) -> None:
    """Make a connecting socket a CURVE client with the engine key pair, trusting the head key."""
    public, secret = _load_key(curve_dir, CURVE_ENGINE_SECRET, secret=True)
    server_public, _ = _load_key(curve_dir, CURVE_HEAD_KEY, secret=False)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def curve_allowed_clients(curve_dir: str) -> Path:
    """The directory a ZAP authenticator loads allowed client public keys from (the engine
    public key `engine.key` lies in it). Raises ValueError when the key is missing."""
    _load_key(curve_dir, CURVE_ENGINE_KEY, secret=False)
    return Path(curve_dir)


def create_curve_keys(directory: Path) -> list[Path]:
    """Write a head and an engine key pair into `directory` (created if needed); secrets 0600."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("head", "engine"):
        public, secret = zmq.auth.create_certificates(directory, name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written
