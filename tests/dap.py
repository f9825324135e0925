"""A minimal Debug Adapter Protocol client, as VS Code speaks to debugpy.

No maintained Python DAP client library exists (debugpy ships the adapter, not a client), so
this is the few messages the debug test needs: Content-Length framed JSON over a socket-like
object (here an SSH direct-tcpip channel, the way Remote-SSH forwards the debug port).
"""

from __future__ import annotations

import ast
import json
import time
from typing import Any


class DapClient:
    def __init__(self, stream: Any, timeout: float = 120) -> None:
        self.stream = stream
        self.stream.settimeout(timeout)  # a silent adapter fails the test, never hangs it
        self.timeout = timeout
        self.seq = 0
        self.buffer = b""
        self.pending: list[dict[str, Any]] = []

    def send(self, command: str, **arguments: Any) -> int:
        self.seq += 1
        body = json.dumps({"seq": self.seq, "type": "request", "command": command,
                           "arguments": arguments}).encode()
        self.stream.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return self.seq

    def _read_message(self) -> dict[str, Any]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        header, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in header.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return json.loads(body)

    def _fill(self) -> None:
        chunk = self.stream.recv(65536)
        if not chunk:
            raise ConnectionError("debug adapter closed the connection")
        self.buffer += chunk

    def wait(self, kind: str, name: str) -> dict[str, Any]:
        """The next response to `name` (kind "response") or event `name` (kind "event")."""
        deadline = time.monotonic() + self.timeout
        key = "command" if kind == "response" else "event"
        for index, message in enumerate(self.pending):
            if message["type"] == kind and message.get(key) == name:
                return self.pending.pop(index)
        while time.monotonic() < deadline:
            message = self._read_message()
            if message["type"] == kind and message.get(key) == name:
                return message
            self.pending.append(message)
        raise TimeoutError(f"no {kind} {name} within {self.timeout} s; got {self.pending}")

    def request(self, command: str, **arguments: Any) -> dict[str, Any]:
        self.send(command, **arguments)
        response = self.wait("response", command)
        if not response.get("success"):
            raise RuntimeError(f"{command}: {response.get('message')}")
        return response.get("body", {})


# Evaluated at a stop in JointAttnProcessor2_0.__call__, as a member would in the debug console:
# the workspace's attention helper on that layer's inputs -> [its shape, worst |row sum - 1|].
ATTENTION_HELPER_CHECK = (
    "(lambda m: [list(m.shape), float((m.sum(-1) - 1).abs().max())])"
    "(__import__('attention_maps').text_to_image(attn, hidden_states, encoder_hidden_states))"
)


def first_statement_line(source: str, cls: str, method: str) -> int:
    """Where a breakpoint "in" `cls.method` of `source` goes: its first statement after any
    docstring (a `def` line only stops once, when it is defined), at the first line of it that
    holds code on every CPython.

    For a statement whose header spans lines, that is where its condition (or iterable,
    value, context manager) starts, not the `if (` line: from Python 3.12 no instruction is
    emitted there, and debugpy moves a breakpoint on a line without code up to the previous
    line with code in the file (pydevd_api.py, add_breakpoint with adjust_line) - for
    diffusers' `FlowMatchEulerDiscreteScheduler.step` its signature, which runs once, when the
    class is made at import, never in `step` (seen on 3.12 and 3.13, debugpy 1.8.22).
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    body = item.body
                    docstring = (isinstance(body[0], ast.Expr)
                                 and isinstance(body[0].value, ast.Constant))
                    statement = body[1 if docstring else 0]
                    header = (getattr(statement, "test", None) or getattr(statement, "iter", None)
                              or getattr(statement, "value", None)
                              or next((i.context_expr for i in getattr(statement, "items", ())),
                                      None))
                    return (header or statement).lineno
    raise LookupError(f"no {cls}.{method} in the source")
