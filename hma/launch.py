"""Starts the three roles as separate local processes and waits until the router says healthy;
`python -m hma demo` and the process-level tests use it. Each process logs to its own file
(printed when a process dies early); stop() sends SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hma.errors import ServiceUnavailableError

START_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """Prefill hosts, decode hosts and a router, each its own process on this machine (colocated:
    no prefill host, the decode hosts prefill their own prompts)."""

    model: str = "demo"
    prefill_flags: list[str] = field(default_factory=list)
    decode_flags: list[str] = field(default_factory=list)
    router_flags: list[str] = field(default_factory=list)
    prefix: dict[str, list[str]] = field(default_factory=dict)  # role -> command prefix (ip netns exec ...)
    prefill_address: str = ""  # host:port the prefill host listens on (default: a free loopback port)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hma-cluster-")))
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    router_port: int = 0
    decode_address: str = ""  # the first decode host's
    num_decode: int = 1
    num_prefill: int = 1
    colocated: bool = False  # no prefill host: the decode hosts prefill their own prompts
    gpus: dict[str, str] = field(default_factory=dict)  # process name (prefill, decode, decode-1) -> its GPUs
    # the address the router names for a prefill host (default: its own; the chaos run puts a proxy between)
    route_prefill: Callable[[str], str] = lambda address: address
    commands: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # process name -> (role, flags)
    num_spawns: dict[str, int] = field(default_factory=dict)  # process name -> times started (its log continues)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> LocalCluster:
        prefills = [] if self.colocated else [self.prefill_address or f"127.0.0.1:{free_port()}"] + [
            f"127.0.0.1:{free_port()}" for _ in range(self.num_prefill - 1)]
        decodes = [f"127.0.0.1:{free_port()}" for _ in range(self.num_decode)]
        self.decode_address = decodes[0]
        self.router_port = free_port()
        for i, prefill in enumerate(prefills):
            pf_host, _, pf_port = prefill.rpartition(":")
            self._spawn("prefill", ["--host", pf_host, "--port", pf_port, "--model", self.model, *self.prefill_flags],
                        name=process_name("prefill", i))
        for i, decode in enumerate(decodes):
            self._spawn("decode", ["--port", decode.rpartition(":")[2], "--model", self.model, *self.decode_flags],
                        name=process_name("decode", i))
        self._spawn("router", ["--port", str(self.router_port), "--model", self.model, "--prefill-hosts",
                               ",".join(map(self.route_prefill, prefills)), "--decode-hosts", ",".join(decodes),
                               *self.router_flags])
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash, not a shutdown)."""
        self.processes[name].kill()
        self.processes[name].wait()

    def wait_listening(self, name: str, timeout: float = START_TIMEOUT_S) -> None:
        """Until the host's latest start has loaded and listens (its log says so once per start)."""
        deadline = time.monotonic() + timeout
        while self.log_tail(name, 10**6).count("listening role=") < self.num_spawns[name]:
            if time.monotonic() > deadline or self.processes[name].poll() is not None:
                raise ServiceUnavailableError(f"{name} did not start listening:\n{self.log_tail(name)}")
            time.sleep(0.1)

    def terminate(self, name: str, timeout: float = STOP_GRACE_S * 4) -> int:
        """SIGTERM, then waits for the process to drain and exit; returns its exit status."""
        self.processes[name].terminate()
        return self.processes[name].wait(timeout)

    def respawn(self, name: str) -> None:
        """Starts a killed process again with its first command (same port); its log continues."""
        role, flags = self.commands[name]
        self._spawn(role, flags, name, mode="a")

    def _spawn(self, role: str, flags: list[str], name: str | None = None, mode: str = "w") -> None:
        name = name or role
        self.commands[name] = (role, flags)
        self.num_spawns[name] = self.num_spawns.get(name, 0) + 1
        env = {**os.environ, "HMA_SECRET": self.secret, "PYTHONUNBUFFERED": "1"}
        if name in self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[name]
        command = [*self.prefix.get(role, []), sys.executable, "-m", "hma", role, *flags]
        with open(self.log_dir / f"{name}.log", mode) as log_file:
            self.processes[name] = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for role, proc in self.processes.items():
                if proc.poll() is not None:
                    raise ServiceUnavailableError(f"the {role} process exited with {proc.returncode}:\n"
                                                  f"{self.log_tail(role)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not up yet, or 503 while hosts load
            time.sleep(0.25)
        raise ServiceUnavailableError(f"the cluster was not healthy within {timeout:.0f} s; logs in {self.log_dir}")

    def log_tail(self, role: str, num_lines: int = 30) -> str:
        lines = (self.log_dir / f"{role}.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_name(role: str, index: int) -> str:
    """A host process's name in a LocalCluster (its log file, its key in gpus): decode, decode-1, ..."""
    return f"{role}-{index}" if index else role


def post_json(url: str, body: dict, timeout: float = 300.0) -> tuple[int, dict]:
    """POSTs JSON; returns (status, parsed body), error statuses included."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def stream_chat(url: str, body: dict, timeout: float = 300.0) -> list[tuple[float, dict]]:
    """POSTs a streaming request; returns each SSE event's (arrival time, parsed data), [DONE] left out."""
    request = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append((time.perf_counter(), json.loads(line.removeprefix("data: "))))
    return events
