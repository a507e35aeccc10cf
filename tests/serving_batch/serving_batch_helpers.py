"""Helpers of the client and batch tests: a `milroi-serve serve` subprocess, a TLS certificate.

(A module of its own name: test modules cannot import `conftest` reliably when several test
folders have one.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from server_testing import free_port, stop_process

MILROI_SERVE = str(Path(sys.executable).with_name("milroi-serve"))


class ServerProcess:
    """`milroi-serve serve` in a subprocess on a fixed loopback port."""

    def __init__(self, bundle: Path, slide_roots: list[Path], log_path: Path,
                 port: int | None = None, token_file: Path | None = None,
                 tls: tuple[Path, Path] | None = None):
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [MILROI_SERVE, "serve", "--model", str(bundle), "--port", str(self.port),
               "--provider", "cpu", "--grace", "1"]
        for root in slide_roots:
            cmd += ["--slide-root", str(root)]
        if token_file is not None:
            cmd += ["--token-file", str(token_file)]
        if tls is not None:
            cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "MLFLOW_TRACKING_URI": ""})

    def wait_serving(self, timeout: float = 120.0, token: str | None = None) -> None:
        from serving.client import ScoringClient, ScoringError

        with ScoringClient(self.target, token=token) as client:
            try:
                client.wait_until_serving(timeout)
            except ScoringError:
                self.stop()
                raise RuntimeError(f"server did not start: {self.log_path.read_text()}") from None

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self._log.close()


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met in {timeout} s")
