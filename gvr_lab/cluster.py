"""Many runs on many workers: a grid's runs as Ray tasks, on this machine or a cluster.

Each run is one Ray task with its own resource request (`run_cpus`, `run_gpus`): fractional GPUs
pack several small runs on one GPU; a run sets its own torch threads (Config.threads), and asks for as
many CPUs unless `run_cpus` says otherwise. The run
directory stays the unit of truth, as in a sequential grid: a task trains (or resumes, or returns)
its run through `gvr_lab.train`, so a task whose worker dies or whose node is lost is retried by
Ray and resumes from the run's last checkpoint, and a finished run is not trained again. The
runs' folders must be on a filesystem every worker sees (one machine: always; a cluster: a shared
mount such as NFS; without one, give each node the same path and copy the run folders back).

Ray is an optional extra (`pip install -e ".[cluster]"`): nothing imports it until a grid asks for
the ray executor.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass

from .errors import UsageError
from .training import NODE_ENV, Config, train


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local instance on this machine's cores; "auto" or HOST:PORT: a cluster
    run_cpus: float = 0.0  # CPUs each run asks for; 0: its Config.threads
    run_gpus: float = 0.0  # GPUs each run asks for; 0.25 packs four runs on one GPU
    max_retries: int = 3  # a task whose worker or node dies is run again this many times

    def __post_init__(self):
        if self.run_cpus < 0 or self.run_gpus < 0 or self.max_retries < 0:
            raise UsageError(
                f"ray resources must be run_cpus >= 0, run_gpus >= 0, max_retries >= 0, got "
                f"{self.run_cpus}, {self.run_gpus}, {self.max_retries}"
            )
        if self.run_gpus > 1 and self.run_gpus != int(self.run_gpus):
            raise UsageError(f"run_gpus above 1 must be a whole number, got {self.run_gpus}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError('the ray executor needs Ray: pip install -e ".[cluster]"') from None
    return ray


def connect(options: RayOptions):
    """Ray, initialized once: a local instance on this machine's cores, or the cluster at the
    address; an address nobody answers at is one line, not a traceback."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if options.address and options.address != "auto":
        check_reachable(options.address)
    try:
        if options.address:
            ray.init(address=options.address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count(), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot reach a Ray cluster at {options.address!r}: {first}") from None
    return ray


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Where no Ray cluster answers, Ray retries for half a minute and logs every try on the
    terminal; one TCP connection and one call to the cluster's GCS tell within `timeout_s`,
    quietly. Something that accepts the connection but is no Ray GCS (a proxy, another service, a
    firewall that holds connections open) is caught by the call."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"a Ray address is auto or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
            wrong = not_a_gcs(connection, address, time.monotonic() + timeout_s)
    except OSError as e:
        raise UsageError(f"cannot reach a Ray cluster at {address!r}: {e.strerror or e}") from None
    if wrong:
        raise UsageError(f"cannot reach a Ray cluster at {address!r}: something answers there, but {wrong}")


# HTTP/2 (RFC 9113) frame types, and the HPACK static-table bytes of the :status a gRPC server sends
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0, 1, 3, 4, 7
STATUS_BYTES = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}


def not_a_gcs(connection: socket.socket, address: str, deadline: float) -> str | None:
    """Why what answers on `connection` is no Ray GCS, or None where it may be one: the gRPC call
    Ray's client makes first (NodeInfoGcsService.GetClusterId, an empty request) over HTTP/2 by
    hand, since Ray bundles no Python gRPC. Only a clear no counts (no HTTP/2, no answer in time, the
    call refused or answered with an HTTP error); anything else is left to ray.init."""

    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def literal(name_index: int, value: str) -> bytes:  # HPACK literal without indexing, indexed name
        return bytes([name_index, len(value)]) + value.encode()

    headers = (
        bytes([0x83, 0x86])  # :method POST, :scheme http
        + literal(4, "/ray.rpc.NodeInfoGcsService/GetClusterId")  # :path
        + literal(1, address)  # :authority
        + bytes([0x0F, 0x10, len("application/grpc")])  # content-type (static index 31)
        + b"application/grpc"
        + b"\x00\x02te\x08trailers"
    )
    connection.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, 0x4, 1, headers)  # END_HEADERS
        + frame(DATA, 0x1, 1, bytes(5))  # END_STREAM; an empty gRPC message
    )
    received, first = b"", True

    def receive(size: int) -> str | None:  # until `received` holds `size` bytes; else why not
        nonlocal received
        while len(received) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                return "it sent no answer to a Ray GCS call in time"
            connection.settimeout(left)
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                return "it sent no answer to a Ray GCS call in time"
            if not chunk:
                return "it closed the connection on a Ray GCS call"
            received += chunk
        return None

    while True:
        failed = receive(9)
        if failed:
            return failed
        length, kind, flags = int.from_bytes(received[:3], "big"), received[3], received[4]
        if first and kind != SETTINGS:  # a server's first frame (HTTP/1 text is no frame at all)
            return "it does not speak HTTP/2, as a Ray GCS does"
        first = False
        failed = receive(9 + length)
        if failed:
            return failed
        stream, payload = int.from_bytes(received[5:9], "big") & 0x7FFFFFFF, received[9 : 9 + length]
        received = received[9 + length :]
        if kind == SETTINGS and not flags & 0x1:
            connection.sendall(frame(SETTINGS, 0x1, 0))  # acknowledged, as the protocol asks
        elif kind in (GOAWAY, RST_STREAM):
            return "it refused a Ray GCS call"
        elif kind == HEADERS and stream == 1:
            status = STATUS_BYTES.get(payload[0] if payload and not flags & 0x28 else -1)  # no padding, priority
            return None if status in (200, None) else f"it answered a Ray GCS call with HTTP status {status}"


def train_remote(fields: dict) -> dict:
    """One run, in a Ray worker: train (or resume, or return) it, recording the node it trains on
    in its summary; its summary comes back."""
    os.environ[NODE_ENV] = import_ray().get_runtime_context().get_node_id()
    return train(Config(**fields)).summary


def run_grid(configs: list, options: RayOptions, report) -> list[dict]:
    """Submit every run, then collect them as they finish while `report` (progress.GridStatus) reads
    the run directories for the running ones; returns each run's summary in grid order. A task
    that raises (the run's own error, not a lost worker: those are retried) fails its run only: the
    grid goes on, and the first failure is raised at the end."""
    ray = connect(options)
    remote = ray.remote(num_gpus=options.run_gpus, max_retries=options.max_retries, retry_exceptions=False)(
        train_remote
    )
    report.submitted()
    pending = {
        remote.options(num_cpus=options.run_cpus or c.threads).remote(dataclasses.asdict(c)): i
        for i, c in enumerate(configs)
    }
    summaries: list[dict | None] = [None] * len(configs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        for ref in ready:
            index = pending.pop(ref)
            try:
                summaries[index] = ray.get(ref)
                report.finished(index, summaries[index])
            except Exception as e:  # noqa: BLE001 - the run's own error, raised in its worker
                report.failed(index, e)
        report.poll()
    report.close()
    return summaries
