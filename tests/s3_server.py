"""A real S3-protocol server (moto) on 127.0.0.1 with fault injection, for the object-storage tests."""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass


@dataclass
class Fault:
    method: str
    path: str  # regex searched in "path?query"
    status: int  # an HTTP status, or 0 for a connection that breaks mid-response
    count: int
    seen: int = 0


class FaultInjector:
    """WSGI middleware: the next ``count`` requests matching a rule get the rule's failure instead."""

    def __init__(self, app):
        self.app = app
        self.rules: list[Fault] = []
        self.lock = threading.Lock()
        self.log: list[str] = []

    def add(self, method: str, path: str, status: int, count: int) -> Fault:
        rule = Fault(method, path, status, count)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def __call__(self, environ, start_response):
        target = environ.get("PATH_INFO", "") + "?" + environ.get("QUERY_STRING", "")
        method = environ["REQUEST_METHOD"]
        with self.lock:
            self.log.append(f"{method} {target}")
            rule = next((r for r in self.rules if r.count > 0 and r.method == method and re.search(r.path, target)),
                        None)
            if rule is not None:
                rule.count -= 1
                rule.seen += 1
        if rule is None:
            return self.app(environ, start_response)
        stream = environ.get("wsgi.input")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if stream is not None and length:
            stream.read(length)  # drain the body so the client sees the answer, not a reset
        if rule.status == 0:
            # Promise more bytes than are sent: the client sees the connection break mid-response.
            start_response("200 OK", [("Content-Length", "1000"), ("Content-Type", "application/xml")])
            return [b"<partial"]
        body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                b"<Message>injected</Message></Error>")
        if rule.status == 503:
            body = body.replace(b"InternalError", b"SlowDown")
        start_response(f"{rule.status} Injected", [("Content-Length", str(len(body))),
                                                   ("Content-Type", "application/xml")])
        return [body]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, self.faults, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
