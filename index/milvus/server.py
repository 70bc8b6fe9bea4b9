"""A real Milvus standalone server in a directory of its own, for tests, benchmarks and try-outs.

The ``milvus`` package on PyPI (the ``milvus-server`` extra; "embedded Milvus",
2.3.x) ships the Milvus standalone binary with embedded etcd and local storage.
Its own ``default_server`` listens on fixed ports and lingers if the process
that started it dies, so this launcher reuses only its configuration writer
and binaries, and runs the binary itself:

* every port (gRPC, etcd, the coordinators', health) is a free one found at
  the first start and kept, so that a restart of the same directory (a test
  that stops and restarts Milvus under a running service) listens where the
  service expects it;
* the server dies with the process that started it (``PR_SET_PDEATHSIG``), so
  a killed test run or ``tools/dev.sh`` leaves no server behind;
* ``stop`` is a SIGTERM with time to flush (then SIGKILL); ``kill`` a SIGKILL.

``python -m biolit_id.index.milvus.server --base-dir DIR`` starts one and
prints ``milvus://127.0.0.1:PORT`` once it answers (``tools/dev.sh serve
--gallery milvus-server``); Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# Started through this tiny Python program rather than a ``preexec_fn``: a fork that
# runs Python in the child of a process with gRPC threads (every biolit-id server, the
# tests) aborts in gRPC's fork handlers. PR_SET_PDEATHSIG survives the exec.
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusServerUnavailable(RuntimeError):
    """The ``milvus`` package is not installed (or its binary cannot run here)."""


class EmbeddedMilvus:
    """One Milvus standalone process over ``base_dir`` (created; data survives restarts)."""

    def __init__(self, base_dir: str | Path, port: int = 0) -> None:
        try:
            from milvus import MilvusServerConfig, _initialize_data_files
        except ImportError as exc:
            raise MilvusServerUnavailable(
                "a Milvus server for tests needs the `milvus` package: "
                "pip install 'biolit-id[milvus-server]'") from exc
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._config = MilvusServerConfig(data_dir=str(self.base_dir))
        self._init_files = _initialize_data_files
        ports = [k for k in self._config.configurable_items if k.endswith("_port")]
        self._config.configs.update({k: _free_port() for k in ports})
        if port:
            self._config.configs["proxy_port"] = int(port)
        self.port = int(self._config.configs["proxy_port"])
        self.health_port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.start_seconds = 0.0
        self._resolved = False

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gallery(self, collection: str, options: str = "") -> str:
        """A ``--gallery`` value for a collection on this server."""
        return f"milvus://127.0.0.1:{self.port}/{collection}" + (f"?{options}" if options else "")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 180.0) -> float:
        """Start and wait until it answers; returns the seconds it took."""
        started = time.monotonic()
        if not self._resolved:  # writes configs/milvus.yaml with our ports and directories
            self._config.resolve()
            self._resolved = True
        else:  # same ports (its bind check fails on the last run's TIME_WAIT sockets)
            self._config.write_config()
        self._embedded_etcd_ports()
        self._init_files(str(self.base_dir))  # unpacks the binary once per directory
        exe = self.base_dir / "bin" / "milvus"
        env = dict(os.environ, DEPLOY_MODE="STANDALONE", METRICS_PORT=str(self.health_port),
                   MILVUS_RUN_DIR=str(self.base_dir / "run"))
        env["LD_LIBRARY_PATH"] = ":".join([str(exe.parent), os.environ.get("LD_LIBRARY_PATH", "")])
        self._log = open(self.base_dir / "logs" / "milvus-stdout.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(exe), "run", "standalone"],
            cwd=self.base_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        self._wait_healthy(started + timeout)
        self.start_seconds = time.monotonic() - started
        return self.start_seconds

    def _embedded_etcd_ports(self) -> None:
        """The embedded etcd's own config: its peer port is otherwise a fixed 2380, so two
        servers on one machine (two test sessions, a try-out beside the tests) collide."""
        client = int(self._config.configs["etcd_port"])
        peer = self._etcd_peer = getattr(self, "_etcd_peer", 0) or _free_port()
        etcd_yaml = self.base_dir / "configs" / "embed-etcd.yaml"
        etcd_yaml.write_text(
            "name: default\n"
            f"listen-client-urls: http://127.0.0.1:{client}\n"
            f"advertise-client-urls: http://127.0.0.1:{client}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer}\n", encoding="ascii")
        milvus_yaml = self.base_dir / "configs" / "milvus.yaml"
        text = milvus_yaml.read_text(encoding="utf-8")
        block = f"\netcd:\n  config:\n    path: {etcd_yaml}\n"
        milvus_yaml.write_text(text.replace("\netcd:\n", block, 1), encoding="utf-8")

    def _wait_healthy(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"Milvus exited during start (rc {self.proc.returncode}); "
                                   f"see {self.base_dir / 'logs'}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if b"OK" in resp.read():
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"Milvus did not answer within the timeout; see "
                                   f"{self.base_dir / 'logs'}")
            time.sleep(0.2)
        while True:  # healthy can come a moment before the proxy takes gRPC calls
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Milvus flushes and leaves etcd cleanly), SIGKILL past ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedMilvus:
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biolit_id.index.milvus.server",
                                     description="Run a local Milvus standalone server.")
    parser.add_argument("--base-dir", type=Path, default=Path("data/milvus-server"))
    parser.add_argument("--port", type=int, default=19530, help="gRPC port (0: a free one)")
    args = parser.parse_args(argv)
    server = EmbeddedMilvus(args.base_dir, port=args.port)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        seconds = server.start()
        print(f"milvus://127.0.0.1:{server.port} (Milvus standalone, data in {server.base_dir},"
              f" started in {seconds:.1f} s)", flush=True)
        while not stop and server.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
