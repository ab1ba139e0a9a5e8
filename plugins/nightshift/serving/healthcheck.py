"""Container health check: exit 0 when the local server reports ready.

Standard library only, so the check costs no numpy/onnxruntime import. Used by
the inference image's ``HEALTHCHECK``; reads ``NIGHTSHIFT_HOST`` and
``NIGHTSHIFT_PORT`` like the server does.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    """GET ``/v2/health/ready``; exit status 0 if it answers 200, else 1."""
    host = os.environ.get("NIGHTSHIFT_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    port = os.environ.get("NIGHTSHIFT_PORT", "8080")
    url = f"http://{host}:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - local URL
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
