#!/usr/bin/env python3
"""Docker's health check of the generation service: exit 0 when /health says ready.

Standard library only, so each check (every few seconds, in the service's container) costs a
bare interpreter start, not the imports of torch and the server.
"""

import os
import sys
import urllib.request

PORT = os.environ.get("SD35_PORT", "8000")

try:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=10) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except OSError as exc:  # 503 while loading, refused while starting
    print(f"sd35-api health: {exc}", file=sys.stderr)
    sys.exit(1)
