"""`swift deploy` as a subprocess, for the tests and benchmarks: a free local port, and `DeployProcess`, which starts
the command with its output in a log file, waits until /v1/models answers, finds the server's pid and stops it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Optional

HOST = "127.0.0.1"
LOG_TAIL = 3000  # characters of the log in an error


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class DeployProcess:
    """`cmd` (`swift deploy ...` without --host / --port: they are appended, `host` (127.0.0.1 unless given) and a
    free port) started in a session of its own, so that stopping it reaches the server it runs as its child; stdout
    and stderr go to `log_path`. `url` is on 127.0.0.1 whatever `host` is (0.0.0.0 listens there too). Also a
    context manager that stops it on exit."""

    def __init__(self, cmd: Sequence, log_path, env: Optional[Mapping[str, str]] = None, host: str = HOST):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = [*map(str, cmd), "--host", host, "--port", str(self.port)]
        self.log_path = str(log_path)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_until_serving(self, timeout: float, poll_s: float = 1.0) -> dict:
        """The /v1/models answer, once the server gives one; RuntimeError with the log's tail if `swift deploy`
        exits first or `timeout` seconds pass."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment
        deadline = time.time() + timeout
        while True:
            try:
                with opener.open(self.url + "/v1/models", timeout=5) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError:  # an answer, if not the one expected: not retried
                raise
            except OSError:  # not listening yet (URLError, a reset or a timeout)
                if self.proc.poll() is not None:
                    raise RuntimeError(f"swift deploy exited {self.proc.returncode} before serving; log "
                                       f"{self.log_path}:\n{self.log()[-LOG_TAIL:]}") from None
                if time.time() > deadline:
                    raise RuntimeError(f"swift deploy did not serve within {timeout:g} s; log {self.log_path}:\n"
                                       f"{self.log()[-LOG_TAIL:]}") from None
                time.sleep(poll_s)

    @property
    def server_pid(self) -> int:
        """The server process: `swift deploy` runs it as its child."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return int(f.read().split()[0])

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM to `swift deploy` and its server, SIGKILL to what is left after `grace_s` seconds (a server whose
        engine hangs never finishes its graceful shutdown)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            deadline = time.time() + grace_s
            while time.time() < deadline:
                self.proc.poll()  # reaps `swift deploy` itself, so that only the server keeps the group alive
                os.killpg(self.proc.pid, 0)
                time.sleep(0.5)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has exited
            pass
        self.proc.wait(timeout=grace_s)

    def __enter__(self) -> "DeployProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
