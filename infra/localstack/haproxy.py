"""haproxy in front of the replicas, reloaded in place when replicas come and go."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.localstack import procs
from infra.localstack.render import render


@dataclass
class Haproxy:
    """haproxy in master-worker mode: SIGUSR2 reloads without dropping connections."""

    root: Path
    port: int

    @property
    def cfg(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def admin_socket(self) -> Path:
        return self.root / "admin.sock"

    @property
    def pid_file(self) -> Path:
        return self.root / "haproxy.pid"

    @property
    def log(self) -> Path:
        return self.root / "haproxy.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, servers: dict[str, int]) -> None:
        """Render the config for `servers` (name -> port) and check it before use."""
        self.root.mkdir(parents=True, exist_ok=True)
        lines = "\n".join(
            f"    server {name} 127.0.0.1:{port}" for name, port in sorted(servers.items())
        )
        text = render(
            "haproxy/haproxy.cfg",
            {
                "HAPROXY_ADMIN_SOCKET": self.admin_socket,
                "LB_LISTEN": "127.0.0.1",
                "LB_PORT": self.port,
                "HAPROXY_SERVERS": lines,
            },
        )
        candidate = self.cfg.with_suffix(".new")
        candidate.write_text(text)
        check = subprocess.run(
            ["haproxy", "-c", "-q", "-f", str(candidate)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise procs.StackError(f"haproxy rejected its config: {check.stderr.strip()}")
        candidate.replace(self.cfg)

    def running(self) -> bool:
        return procs.alive(procs.read_pid(self.pid_file))

    def apply(self, servers: dict[str, int], timeout: float = 10.0) -> None:
        """Start haproxy with `servers`, or reload the running one with the new list."""
        self.write_config(servers)
        if self.running():
            pid = procs.read_pid(self.pid_file)
            assert pid is not None
            os.kill(pid, signal.SIGUSR2)  # the master re-reads the config, old workers drain
        else:
            procs.ensure_port_free(self.port, "LB_PORT")
            procs.spawn(["haproxy", "-W", "-db", "-f", str(self.cfg)], self.log, self.pid_file)
        if not procs.wait_until(lambda: procs.port_open(self.port), timeout):
            raise procs.StackError(f"haproxy did not start:\n{procs.tail(self.log)}")

    def command(self, line: str) -> str:
        """One command on the runtime API (`show servers state`, `set server ...`)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(3)
            sock.connect(str(self.admin_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Each backend server's health as haproxy sees it: UP, DOWN, MAINT, ..."""
        states: dict[str, str] = {}
        for line in self.command("show stat").splitlines():
            fields = line.split(",")
            if (
                len(fields) > 17
                and fields[0] == "replicas"
                and fields[1]
                not in (
                    "FRONTEND",
                    "BACKEND",
                )
            ):
                states[fields[1]] = fields[17]
        return states

    def stop(self, timeout: float = 10.0) -> bool:
        return procs.stop_recorded(self.pid_file, signal.SIGTERM, timeout)
