#!/opt/venv/bin/python
"""HEALTHCHECK of the milroi-serve image: a grpc.health.v1 Check of the local server.

    milroi-healthcheck              in the image's HEALTHCHECK: checks 127.0.0.1:$MILROI_GRPC_PORT
                                    when the container runs `milroi-serve serve`, else exits 0
    milroi-healthcheck HOST:PORT    checks that address, whatever the container runs

Exit 0 when the server answers SERVING (its model is loaded), 1 otherwise, the reason on stderr.
A container running the batch job (`milroi-serve score`) has no server to ask; it counts as
healthy while it runs, so that one image serves both uses. A server started with --tls-cert
needs MILROI_HEALTH_TLS_CA (the CA, PEM) for the check to connect.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 4.0


def runs_server(cmdline_file: Path = Path("/proc/1/cmdline")) -> bool:
    """Whether PID 1 (the container's command, possibly under an init) is `milroi-serve serve`."""
    try:
        args = cmdline_file.read_bytes().split(b"\0")
    except OSError:
        return True   # cannot tell: check rather than pass blindly
    for i, arg in enumerate(args):
        if arg.endswith(b"milroi-serve"):
            return b"serve" in args[i + 1:i + 2]
    return False


def check(target: str) -> int:
    ca = os.environ.get("MILROI_HEALTH_TLS_CA")
    channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(ca).read_bytes()))
               if ca else grpc.insecure_channel(target))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            print(f"unhealthy: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {target} says {status}", file=sys.stderr)
        return 1
    print(f"{target}: {status}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        return check(argv[1])
    if not runs_server():
        return 0
    return check(f"127.0.0.1:{os.environ.get('MILROI_GRPC_PORT', '50051')}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
