"""Whether the Hugging Face Hub can be used now: a hub name given on a machine without a network fails in one
line within seconds, instead of a traceback after the Hub client's retries."""

import os
import socket
import threading
from typing import List, Optional
from urllib.parse import urlparse

from dstrain.errors import ConfigError

# How long to wait for a TCP connection to the Hub (or the HTTPS proxy) before calling it unreachable.
HUB_CONNECT_TIMEOUT_S = 3.0
# The values huggingface_hub reads as true in HF_HUB_OFFLINE.
_TRUE = ("1", "ON", "YES", "TRUE")


def require_hub(name: str, instead: str) -> None:
    """Raise ConfigError naming `name` and saying what to do `instead` when the Hub is switched off
    (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) or cannot be reached."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").upper() in _TRUE:
            raise ConfigError(
                f"{name} is not a local path, and reading it from the Hugging Face Hub needs the network, "
                f"but {variable}={os.environ[variable]}. {instead}"
            )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    problem = _unreachable(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or endpoint)
    if problem:
        raise ConfigError(
            f"{name} is not a local path, and the Hugging Face Hub ({endpoint}) cannot be reached ({problem}). "
            f"{instead}"
        )


def _unreachable(url: str) -> Optional[str]:
    """Why a TCP connection to the URL's host fails, or None. It runs in a daemon thread because a name lookup
    ignores socket timeouts and can hang for long on a machine without a network."""
    parsed = urlparse(url)
    address = (parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443))
    outcome: List[Optional[str]] = [f"no answer within {HUB_CONNECT_TIMEOUT_S:g} s"]

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=HUB_CONNECT_TIMEOUT_S).close()
            outcome[0] = None
        except OSError as error:
            outcome[0] = str(error)

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(HUB_CONNECT_TIMEOUT_S)
    return outcome[0]
