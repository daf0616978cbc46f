"""Is the MLflow tracking server up? The fast check a sweep makes before anything starts (no MLflow import)."""

from __future__ import annotations

import urllib.error
import urllib.request


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do."""



def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any trial starts, when an HTTP tracking server does not answer."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise TrackingError(
        f"MLflow tracking server {tracking_uri} is not reachable ({problem}); start it "
        f"(`mlflow server --host 127.0.0.1 --port PORT`) or pass --tracking-uri for one that runs"
    )
