"""Connecting to Ray: a cluster's address checked, its token found, failures told in one line.

:func:`connect` starts Ray on this machine, or joins the cluster at an address. Before Ray
itself tries (which on a bad address retries for 20-40 s, printing a warning a second),
the address is checked in two quick steps:

1. :func:`check_address`: a TCP connection opens to ``HOST:PORT`` within 3 s.
2. :func:`probe_cluster`: a child process asks the head's GCS for the cluster ID (Ray's
   own client, under 1 s against a Ray head), killed :data:`PROBE_TIMEOUT_S` after it has
   imported Ray: a
   server that answers but is no Ray head, or a head that refuses the token, ends here.

Ray 2.x clusters started with ``ray start --head`` turn token authentication on when the
head's machine has a token (``~/.ray/auth_token``, which any local ``ray.init()`` writes),
but a driver that names an ``--address`` sends no token unless ``RAY_AUTH_MODE=token`` is
set. :func:`enable_token` does that for Ray when a token is at hand: ``RAY_AUTH_TOKEN``,
the file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token`` (Ray's order). An explicit
``RAY_AUTH_MODE`` is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from rapa.errors import RapaError

__all__ = ["CONNECT_TIMEOUT_S", "IMPORT_TIMEOUT_S", "PROBE_TIMEOUT_S", "check_address", "connect", "enable_token", "find_token",
           "probe_cluster"]

CONNECT_TIMEOUT_S = 3.0
"""Seconds to wait for a TCP connection to a cluster address before giving up."""
PROBE_TIMEOUT_S = 5.0
"""Seconds a head may take to answer the GCS probe once Ray is imported in the child (a Ray
head answers in well under a second)."""
IMPORT_TIMEOUT_S = 120.0
"""Seconds the probe's child may take to start Python and import Ray (slow on a busy machine)."""
_DEFAULT_PORTS = {"": 6379, "ray": 10001}
_TOKEN_HELP = ("copy the head's token (`ray get-auth-token` on the head node) into ~/.ray/auth_token here, "
               "or name a file holding it in RAY_AUTH_TOKEN_PATH")

# the child process of probe_cluster: one JSON line with the outcome
_PROBE = """
import json, sys
try:
    from ray._raylet import GcsClient
    print("imported", flush=True)
    GcsClient(address=sys.argv[1]).cluster_id
    out = {"ok": True}
except Exception as exc:
    out = {"ok": False, "kind": type(exc).__name__, "message": str(exc).strip().splitlines()[0][:300]}
print(json.dumps(out), flush=True)
"""


def _split(address: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``HOST:PORT``, ``ray://HOST:PORT`` or ``[IPv6]:PORT``."""
    scheme, _, rest = address.rpartition("://")
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [IPv6]:port
        host, _, port_text = rest[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:
        host, _, port_text = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        port = int(port_text) if port_text else _DEFAULT_PORTS.get(scheme, 6379)
    except ValueError:
        raise RapaError(f"Ray cluster address {address!r} is not HOST:PORT") from None
    if not host:
        raise RapaError(f"Ray cluster address {address!r} is not HOST:PORT")
    return scheme, host, port


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """RapaError naming ``address`` unless a TCP connection to it opens within ``timeout`` s.

    ``HOST:PORT`` (the head's GCS port, default 6379) and ``ray://HOST:PORT`` (Ray client,
    default 10001) are checked; ``auto`` (the cluster started on this machine) is not.
    """
    if address == "auto" or address.startswith("local"):
        return
    _, host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise RapaError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} "
                        f"(is the head running? start it with `ray start --head`)") from None


def find_token() -> str | None:
    """Where a Ray authentication token is, in Ray's order: ``RAY_AUTH_TOKEN``, the file
    named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``; None if nowhere. RapaError if
    ``RAY_AUTH_TOKEN_PATH`` names a missing file."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        if not Path(named).expanduser().is_file():
            raise RapaError(f"RAY_AUTH_TOKEN_PATH={named} names no file; {_TOKEN_HELP}")
        return named
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def enable_token() -> str | None:
    """Have Ray send the token of :func:`find_token` (``RAY_AUTH_MODE=token``, for this
    process and its children) unless ``RAY_AUTH_MODE`` is set; returns the token's source."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ.get("RAY_AUTH_TOKEN_PATH") if os.environ["RAY_AUTH_MODE"] == "token" else None
    source = find_token()
    if source is None:
        return None
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:  # Ray caches its config: read the environment again (as Ray does itself)
        try:
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # an older or newer Ray without this: its next init reads the environment
            pass
    return source


def probe_cluster(address: str, token: str | None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """RapaError in one line unless the Ray head at ``address`` (``HOST:PORT``) answers Ray's
    GCS client in a child process within ``timeout`` s, with the token if one is in use."""
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, address], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=os.environ.copy())
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = lines.get(timeout=IMPORT_TIMEOUT_S)
        answer = lines.get(timeout=timeout) if first == "imported" else first
    except queue.Empty:
        raise RapaError(f"no Ray head answers at {address} within {timeout:g} s: something listens there, "
                        f"but not a Ray cluster's head (its GCS port, 6379 unless `ray start --head --port` "
                        f"chose another)") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if not answer or not answer.startswith("{"):
        return  # the probe itself could not run (an unusual Ray): let ray.init have its say
    result: dict[str, Any] = json.loads(answer)
    if result.get("ok"):
        return
    kind, message = result.get("kind", ""), result.get("message", "")
    if kind == "AuthenticationError" or "InvalidAuthToken" in message or "Unauthenticated" in message:
        if token is None:
            raise RapaError(f"the Ray cluster at {address} uses token authentication and no token was "
                            f"found here: {_TOKEN_HELP}")
        raise RapaError(f"the Ray cluster at {address} refused the token from {token}: {_TOKEN_HELP}")
    if kind == "ModuleNotFoundError":
        return
    raise RapaError(f"no Ray head answers at {address}: {kind}: {message}")


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure Ray is initialised (the cluster at ``address``, else a local one with
    ``num_cpus``); True if this call started it (and must ``ray.shutdown()`` it).
    RapaError in one line naming the address if it cannot be used."""
    if address is not None:
        check_address(address)
    try:
        import ray
    except ImportError:
        raise RapaError('sweeps run on Ray, which is not installed: pip install "rapa[ray]"') from None
    if ray.is_initialized():
        return False
    token = None
    if address is not None and address != "auto" and not address.startswith(("local", "ray://")):
        token = enable_token()
        probe_cluster(address, token)
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                                  configure_logging=True)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError ... from Ray
        where = f"the Ray cluster at {address}" if address is not None else "a local Ray instance"
        first = str(exc).strip().splitlines()[:1]
        raise RapaError(f"cannot connect to {where}: {type(exc).__name__}: {first[0] if first else ''}") from None
    return True
