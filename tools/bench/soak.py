"""``biolit-id bench --soak``: mixed identify/add/remove for a long time, with kill -9s.

Not in CI (30 minutes by default). The server runs as a real ``biolit-id
serve`` process that is killed with SIGKILL every ``--kill-every`` seconds
and restarted on the same data directory. After each restart every add the
clients saw acknowledged (and not removed since) must be listed, and every
acknowledged removal must be gone: "acked" and "found" must be equal. The
report gives requests served, errors by status code, the check after each
restart and the server's RSS over time (docs/operations.md explains it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from biolit_id.index.core.atomic import atomic_write
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc

SPECIES = ("Carcinus maenas", "Patella vulgata", "Asterias rubens")


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("soak (--soak): long mixed load with kill -9, not in CI")
    group.add_argument("--soak", action="store_true", help="run the soak instead of sections")
    group.add_argument("--soak-minutes", type=float, default=30.0)
    group.add_argument("--kill-every", type=float, default=180.0, help="seconds between kills")
    group.add_argument("--soak-clients", type=int, default=4,
                       help="identify clients (one adder and one remover run beside them)")
    group.add_argument("--soak-out", type=Path, default=Path("bench-results/soak.json"))


class Ledger:
    """What the clients were told: acknowledged adds and removals."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[int] = set()  # acked adds not acked-removed
        self.removed: set[int] = set()  # acked removals
        self.maybe: set[int] = set()  # removals cut by a kill: either outcome is fine
        self.codes: Counter[str] = Counter()

    def count(self, method: str, code: str) -> None:
        with self.lock:
            self.codes[f"{method} {code}"] += 1


class Server:
    def __init__(self, model: str, data_dir: Path, log: Path) -> None:
        self.model, self.data_dir, self.log = model, data_dir, log
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> float:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        started = time.monotonic()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "biolit_id.cli.main", "serve", "--model", self.model,
                 "--data-dir", str(self.data_dir), "--port", str(self.port),
                 "--runtime", "torch", "--precision", "fp32"],
                stdout=log, stderr=log)
        channel = grpc.insecure_channel(self.address)
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"biolit-id serve exited; see {self.log}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    channel.close()
                    return time.monotonic() - started
            except grpc.RpcError:
                time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return 0.0


def _client_loop(kind: str, server: Server, ledger: Ledger, stop: threading.Event,
                 seed: int) -> None:
    rng = np.random.default_rng(seed)
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.SpeciesIdentifierStub(channel)
    while not stop.is_set():
        try:
            if kind == "identify":
                stub.Identify(pb.IdentifyRequest(embedding=rng.normal(size=512).tolist(),
                                                 num_similar=3), timeout=10)
            elif kind == "add":
                items = [pb.AddExemplarRequest(species=random.choice(SPECIES),
                                               embedding=rng.normal(size=512).tolist())
                         for _ in range(int(rng.integers(1, 4)))]
                reply = stub.AddExemplars(iter(items), timeout=20)
                with ledger.lock:
                    ledger.live.update(reply.exemplar_ids)
            else:
                with ledger.lock:
                    victim = random.choice(sorted(ledger.live)) if len(ledger.live) > 20 else 0
                    if victim:
                        ledger.live.discard(victim)
                        ledger.maybe.add(victim)
                if not victim:
                    stop.wait(0.2)
                    continue
                stub.RemoveExemplars(pb.RemoveExemplarsRequest(exemplar_ids=[victim]),
                                     timeout=20)
                with ledger.lock:
                    ledger.maybe.discard(victim)
                    ledger.removed.add(victim)
                    # An add of the same photo answered meanwhile (with this id) came
                    # before the removal on the server: the photo is gone either way.
                    ledger.live.discard(victim)
            ledger.count(kind, "OK")
        except grpc.RpcError as exc:
            ledger.count(kind, exc.code().name)
            stop.wait(0.1)  # the server is being killed or restarting
    channel.close()


def _found(server: Server) -> set[int]:
    ids, token = set(), ""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SpeciesIdentifierStub(channel)
        while True:
            page = stub.ListExemplars(pb.ListExemplarsRequest(page_size=1000, page_token=token),
                                      timeout=60)
            ids.update(e.exemplar_id for e in page.exemplars)
            token = page.next_page_token
            if not token:
                return ids


def run_soak(args: argparse.Namespace) -> int:
    if not args.model:
        print("biolit-id bench --soak: --model is required", file=sys.stderr)
        return 2
    data_dir = args.data_dir / "soak"
    data_dir.mkdir(parents=True, exist_ok=True)
    server = Server(args.model, data_dir, args.soak_out.with_suffix(".server.log"))
    args.soak_out.parent.mkdir(parents=True, exist_ok=True)
    ledger = Ledger()
    report: dict = {"settings": {"minutes": args.soak_minutes, "kill_every_s": args.kill_every,
                                 "identify_clients": args.soak_clients},
                    "restarts": [], "rss_mb": []}
    report["first_start_s"] = round(server.start(), 1)
    ledger.live |= _found(server)  # a data dir from an earlier soak counts as acknowledged
    started = time.monotonic()
    end = started + args.soak_minutes * 60
    ok = True
    while time.monotonic() < end:
        stop = threading.Event()
        kinds = ["identify"] * args.soak_clients + ["add", "remove"]
        # New seeds each round: the same photos again would only be found, not added.
        round_seed = len(report["restarts"]) * len(kinds)
        threads = [threading.Thread(target=_client_loop,
                                    args=(k, server, ledger, stop, round_seed + i),
                                    daemon=True) for i, k in enumerate(kinds)]
        for t in threads:
            t.start()
        next_kill = min(end, time.monotonic() + args.kill_every)
        while time.monotonic() < next_kill:
            report["rss_mb"].append([round(time.monotonic() - started), server.rss_mb()])
            time.sleep(min(10.0, max(0.1, next_kill - time.monotonic())))
        server.kill()
        stop.set()
        for t in threads:
            t.join()
        restart_s = server.start()
        found = _found(server)
        with ledger.lock:
            lost = sorted(ledger.live - found)
            resurrected = sorted((ledger.removed & found) - ledger.maybe)
            ledger.live |= ledger.maybe & found  # cut removals that did not happen
            ledger.removed |= ledger.maybe - found
            ledger.maybe.clear()
            entry = {"at_s": round(time.monotonic() - started), "restart_s": round(restart_s, 1),
                     "acked": len(ledger.live), "found": len(found & ledger.live),
                     "lost": lost[:20], "removed_but_found": resurrected[:20]}
        report["restarts"].append(entry)
        ok = ok and not lost and not resurrected
        print(f"[{entry['at_s']:>5} s] kill -9, restart {entry['restart_s']} s: acked "
              f"{entry['acked']}, found {entry['found']}, lost {len(lost)}", flush=True)
    server.kill()
    report["requests"] = dict(sorted(ledger.codes.items()))
    report["served"] = sum(n for key, n in ledger.codes.items() if key.endswith(" OK"))
    report["passed"] = ok
    atomic_write(args.soak_out, json.dumps(report, indent=1))
    print(f"soak: {report['served']} requests served, errors "
          f"{ {k: n for k, n in ledger.codes.items() if not k.endswith(' OK')} }, "
          f"{len(report['restarts'])} kills, {'no' if ok else 'SOME'} acknowledged change lost;"
          f" report in {args.soak_out}")
    return 0 if ok else 1
