"""Bring a real NDIF 0.1.2 stack up on 127.0.0.1, serve one model, and take it all down again.

The services, each started in its own session (so that it and everything it
spawns can be stopped as a unit, and nothing else is touched):

    redis-server      request queue and response pub/sub
    moto_server       S3 stand-in for the object store (non-blocking results)
    ray start --head  Ray head: GCS, raylet, dashboard (NDIF reads its state API),
                      client server, and the workers of the controller and model actors
    controller        launches NDIF's detached controller actor, then exits
    gunicorn          NDIF's API and its queue dispatcher

Every wait is a poll against a deadline that also watches the processes: a
service that dies fails the bring-up at once with the tail of its log, and one
that never gets ready fails it at its deadline. No fixed sleeps.

The server processes get a `PYTHONPATH` holding only the CPU actor shim, and
`start` checks that they cannot import the package under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
PACKAGE = "nnsight_toolbox"

#: Seconds each stage may take before the bring-up is declared failed.
DEADLINES = {"redis": 30, "s3": 60, "ray": 120, "controller": 120, "api": 120, "deploy": 240}
#: Seconds the session leaders get to stop their own children after SIGTERM.
LEADER_GRACE = 5
#: Seconds every process left gets after SIGTERM, and again after SIGKILL.
STOP_GRACE = 15


class StackError(RuntimeError):
    """The NDIF stack could not be brought up."""


def free_port() -> int:
    """A TCP port that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def tcp_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class NdifStack:
    """A running NDIF stack. Build it with `NdifStack.start(model_path)`; always call `stop()`.

    Attributes:
        api_url: Where the client sends requests, ``http://127.0.0.1:<port>``.
        model_path: The checkpoint folder the model was deployed from.
        model_key: The key the deployed model answers to.
        timings: Seconds each stage took, for the report.
    """

    root: Path
    python: str
    ports: dict[str, int]
    services: list[Service] = field(default_factory=list)
    api_url: str = ""
    model_path: str = ""
    model_key: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ set-up

    @classmethod
    def start(cls, model_path: str, *, task: str = "text-generation") -> "NdifStack":
        """Start every service, deploy ``model_path`` and return the ready stack.

        On any failure the services already started are stopped before the error propagates.
        """
        # A short root: Ray's Unix socket paths live under it and must stay under 108 bytes.
        root = Path(tempfile.mkdtemp(prefix="ndif-", dir="/tmp"))
        names = ["redis", "s3", "gcs", "client", "dashboard", "agent_grpc", "agent_http", "metrics",
                 "object_manager", "node_manager", "runtime_env", "api"]
        ports: dict[str, int] = {}
        while len(ports) < len(names):  # distinct ports, each free when picked
            port = free_port()
            if port not in ports.values():
                ports[names[len(ports)]] = port
        stack = cls(root=root, python=sys.executable, ports=ports)
        stack.api_url = f"http://127.0.0.1:{ports['api']}"
        try:
            stack._bring_up(model_path, task)
        except BaseException:
            stack.stop()
            raise
        return stack

    def env(self) -> dict[str, str]:
        """The environment of every server process."""
        p = self.ports
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_", "RAY_", "PYTHON"))}
        env.update(
            PATH=f"{Path(self.python).parent}{os.pathsep}{env.get('PATH', '')}",
            # Only the actor shim: the package under test must ship itself.
            PYTHONPATH=str(HERE),
            PYTHONNOUSERSITE="1",
            NDIF_HOME=str(self.root / "home"),
            NDIF_REDIS_URL=f"redis://127.0.0.1:{p['redis']}",
            NDIF_RAY_ADDRESS=f"ray://127.0.0.1:{p['client']}",
            NDIF_RAY_HEAD_PORT=str(p["gcs"]),
            NDIF_RAY_DASHBOARD_PORT=str(p["dashboard"]),
            NDIF_OBJECT_STORE_URL=f"http://127.0.0.1:{p['s3']}",
            NDIF_OBJECT_STORE_ACCESS_KEY="testing",
            NDIF_OBJECT_STORE_SECRET_KEY="testing",
            NDIF_API_PORT=str(p["api"]),
            NDIF_API_URL=self.api_url,
            NDIF_DEFAULT_MODEL_ACTOR_CLASS="ndif_cpu_actor.CPUModelActor",
            NDIF_DEFAULT_DTYPE="float32",
            NDIF_MODEL_CACHE_PERCENTAGE="0.1",
            # A request that hangs fails instead of holding the model (and CI) forever.
            NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS="120",
            NDIF_LOG_LEVEL="INFO",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
            GRPC_ENABLE_FORK_SUPPORT="0",
            # Keep Ray on the loopback address: on Linux it otherwise swaps 127.0.0.1 for the
            # machine's outward address (`resolve_ip_for_localhost`).
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            # On SIGTERM, stop at once instead of draining the node first (up to 30 s).
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
        )
        return env

    def _spawn(self, name: str, command: list[str], **extra_env: str) -> Service:
        log = self.root / f"{name}.log"
        env = {**self.env(), **extra_env}
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command,
                env=env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: stopped as a unit, by its id
            )
        service = Service(name, process, log)
        self.services.append(service)
        return service

    def _wait(self, what: str, ready: Callable[[], bool], watch: list[Service], deadline: float) -> None:
        """Poll ``ready`` until it holds; fail early if a watched process exits."""
        started = time.monotonic()
        delay = 0.05
        while True:
            if ready():
                return
            for service in watch:
                if service.process.poll() is not None:
                    raise StackError(
                        f"NDIF {service.name} exited with code {service.process.returncode} while waiting "
                        f"for {what}. Last lines of {service.log}:\n{service.tail()}"
                    )
            if time.monotonic() - started > deadline:
                logs = "\n\n".join(f"--- {s.name} ({s.log}) ---\n{s.tail()}" for s in watch)
                raise StackError(f"NDIF {what} was not ready after {deadline} s.\n{logs}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _bring_up(self, model_path: str, task: str) -> None:
        self._check_isolated()
        bin_dir = Path(self.python).parent
        p = self.ports
        t0 = time.monotonic()

        redis = self._spawn("redis", [shutil.which("redis-server") or "redis-server",
                                      "--bind", "127.0.0.1", "--port", str(p["redis"]),
                                      "--save", "", "--appendonly", "no", "--dir", str(self.root)])
        s3 = self._spawn("s3", [str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(p["s3"])])
        resources = {"head": 10, "cuda_memory_bytes": 8 << 30, "cpu_memory_bytes": 8 << 30}
        ray = self._spawn("ray", [
            str(bin_dir / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={p['gcs']}",
            f"--ray-client-server-port={p['client']}",
            f"--object-manager-port={p['object_manager']}",
            f"--node-manager-port={p['node_manager']}",
            f"--runtime-env-agent-port={p['runtime_env']}",
            f"--metrics-export-port={p['metrics']}",
            # NDIF's controller places models only on nodes that report a GPU and its memory.
            "--num-gpus=1", "--num-cpus=4",
            f"--resources={json.dumps(resources)}",
            # NDIF reads node state through the dashboard's state API.
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={p['dashboard']}",
            f"--dashboard-agent-grpc-port={p['agent_grpc']}",
            f"--dashboard-agent-listen-port={p['agent_http']}",
            f"--temp-dir={self.root / 'ray'}",
            "--disable-usage-stats", "--include-log-monitor=false",
        ])

        self._wait("redis", lambda: self._redis("PING") == "PONG", [redis], DEADLINES["redis"])
        self.timings["redis"] = time.monotonic() - t0
        self._wait("the S3 stand-in", lambda: http_ok(f"http://127.0.0.1:{p['s3']}/"), [s3], DEADLINES["s3"])
        self.timings["s3"] = time.monotonic() - t0
        dashboard = f"http://127.0.0.1:{p['dashboard']}"
        self._wait(
            "the Ray head",
            lambda: tcp_open(p["client"]) and http_ok(f"{dashboard}/api/v0/nodes", timeout=5),
            [ray],
            DEADLINES["ray"],
        )
        self.timings["ray"] = time.monotonic() - t0

        # Launches the detached controller actor and exits; the API can start meanwhile.
        controller = self._spawn(
            "controller",
            [self.python, "-m", "ndif.services.ray.deployments.controller.controller"],
            RAY_ADDRESS=f"127.0.0.1:{p['gcs']}",
        )
        api = self._spawn("api", [
            str(bin_dir / "gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
            "--bind", f"127.0.0.1:{p['api']}", "ndif.services.api.app:app",
        ], NDIF_SERVICE="api")
        self._wait("the controller launch", lambda: controller.process.poll() is not None, [],
                   DEADLINES["controller"])
        if controller.process.returncode != 0:
            raise StackError(f"NDIF's controller launch failed:\n{controller.tail()}")
        self.timings["controller"] = time.monotonic() - t0

        # The deployment needs only the controller: it loads the model while the API comes up.
        deploy_out = self.root / "deploy.json"
        deploy = self._spawn("deploy", [self.python, str(HERE / "ndif_deploy.py"), model_path, task, str(deploy_out)])
        self._wait(
            "the API",
            lambda: http_ok(f"{self.api_url}/ping") and self._redis("GET", "ray:connected") not in (None, ""),
            [api, ray, redis],
            DEADLINES["api"],
        )
        self.timings["api"] = time.monotonic() - t0
        self._wait("the model deployment", lambda: deploy.process.poll() is not None, [api, ray, redis],
                   DEADLINES["deploy"])
        if deploy.process.returncode != 0 or not deploy_out.exists():
            raise StackError(f"Deploying {model_path} failed:\n{deploy.tail()}")
        self.model_key = json.loads(deploy_out.read_text())["model_key"]
        self.model_path = model_path
        self.timings["deploy"] = time.monotonic() - t0

    def _check_isolated(self) -> None:
        """Fail unless the server processes are unable to import the package under test."""
        probe = subprocess.run(
            [self.python, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({PACKAGE!r}) is not None)"],
            env=self.env(), cwd=self.root, capture_output=True, timeout=60,
        )
        if probe.returncode != 0:
            raise RuntimeError(
                f"The NDIF server processes could import `{PACKAGE}` ({self.python}), so a test could not "
                f"tell whether the package ships itself with a request. Build the environment with "
                f"`bash ci/remote-env.sh`, which installs the package's dependencies but not the package."
            )

    def _redis(self, *command: str) -> str | None:
        """Run one Redis command with redis-cli; ``None`` if Redis does not answer."""
        try:
            done = subprocess.run(
                [shutil.which("redis-cli") or "redis-cli", "-h", "127.0.0.1", "-p", str(self.ports["redis"]), *command],
                capture_output=True, text=True, timeout=5,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # --------------------------------------------------------------- tear-down

    def stop(self) -> list[str]:
        """Stop every process in the sessions this stack started, and only those.

        SIGTERM to each session's leader (`ray start` then stops the Ray
        processes it started), then SIGTERM to whatever is still in those
        sessions (the gunicorn master waits for NDIF's queue dispatcher, which
        only stops when signalled itself), then SIGKILL, each after a bounded
        wait. Returns a line per process that had to be killed.
        """
        sessions = [s.process.pid for s in reversed(self.services)]  # a leader's pid is its session id
        for sid in sessions:
            _signal(sid, signal.SIGTERM)
        self._wait_until(lambda: all(s.process.poll() is not None for s in self.services), LEADER_GRACE)
        for sid in sessions:
            for pid in session_members(sid):
                _signal(pid, signal.SIGTERM)
        self._wait_until(lambda: not any(session_members(sid) for sid in sessions), STOP_GRACE)
        killed = []
        for sid in sessions:
            for pid in session_members(sid):
                killed.append(f"{pid} {_cmdline(pid)[:120]}")
                _signal(pid, signal.SIGKILL)
        self._wait_until(lambda: not any(session_members(sid) for sid in sessions), STOP_GRACE)
        shutil.rmtree(self.root, ignore_errors=True)
        return killed

    def _wait_until(self, done: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for service in self.services:
                service.process.poll()  # reap our own children
            if done():
                return
            time.sleep(0.1)

    def leftovers(self) -> list[str]:
        """Processes still in this stack's sessions (should be none after `stop`)."""
        return [f"{pid} {_cmdline(pid)[:120]}" for s in self.services for pid in session_members(s.process.pid)]


def session_members(sid: int) -> list[int]:
    """The pids of live processes whose session id is ``sid`` (zombies excluded)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            with open(f"/proc/{pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
            continue
        if state != "Z":
            members.append(pid)
    return members


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
