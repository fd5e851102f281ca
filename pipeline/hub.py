"""Reaching the Hugging Face Hub: fail in seconds with a clear line when it cannot be reached."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_offline_by_setting() -> bool:
    return any(os.environ.get(name, "").lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub endpoint accepts a TCP connection.

    huggingface_hub retries an unreachable host for about 25 s before it gives up; checking first
    turns that into an immediate, explainable error.
    """
    if hub_offline_by_setting():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
