"""Helpers of the tests that start servers (gRPC, metrics, MLflow): a free loopback port, waiting
for grpc.health.v1 SERVING while watching the process, and a self-signed TLS certificate."""
from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM (the servers' graceful shutdown), then SIGKILL if it is still running after
    `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_block() -> tuple[int, int]:
    """This process's ports: a block of its own below the kernel's ephemeral range, one block per
    xdist worker (PYTEST_XDIST_WORKER=gwN), so that a port handed out here is never also handed
    to another worker, or to a client socket's ephemeral port, before its server binds it.
    From 20000: Ray's worker processes take ports in 10002-19999."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = 1500
    start = 20000 + index * size
    return start, min(start + size, low)


_next_port = itertools.count()


def free_port() -> int:
    """A loopback port nothing listens on now, from this process's block (each call the next
    one), or one the kernel picks where the block does not fit below its ephemeral range."""
    start, end = _port_block()
    for _ in range(max(0, end - start)):
        port = start + next(_next_port) % (end - start)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:    # in use: a server of an earlier test, or another program
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, process: subprocess.Popen, log_path: Path,
                 timeout: float = 120) -> None:
    """Until the server at `address` reports SERVING; fails at once, with the end of its log,
    if the process exits first."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, Path(log_path).read_text(errors="replace")[-3000:]
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {address} not SERVING after {timeout} s: "
                       f"{Path(log_path).read_text(errors='replace')[-2000:]}")


def write_self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (cert.pem, key.pem): the server's
    certificate and the client's CA at once."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
