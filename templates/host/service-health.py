"""Run by doctor in the container of the generation service (python -c, the port as its
argument): /health as the server itself answers it, 503 included, on one line."""

import sys
import urllib.error
import urllib.request

try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=10).read()
          .decode())
except urllib.error.HTTPError as exc:
    print(exc.read().decode())
