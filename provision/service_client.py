"""One request to the team's generation service (templates/service/sd35_api.py), answer read whole.

`verify --service` sends it through the host's SSH connection; bench/service_throughput.py
sends it to a server on the GPU machine's loopback. Stdlib only, and no other provision
module: the bench imports this on a GPU machine that has neither fabric nor paramiko.
"""

from __future__ import annotations

import http.client
import json
from typing import Any


def send(client: http.client.HTTPConnection, method: str, path: str,
         body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    """`body` as JSON; the status, headers (names lower-cased: HTTP's are case-blind) and body
    back. The connection is closed after it, answered or not, so no call leaves a socket (or
    the SSH channel under it) open."""
    try:
        client.request(method, path, body=json.dumps(body) if body is not None else None,
                       headers={"Content-Type": "application/json"})
        answer = client.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        client.close()
