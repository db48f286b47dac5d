"""Which cluster a client command talks to, and how: the head's job API (the dashboard URL) and its auth.

Every command that talks to a cluster takes ``--address``; without it ``RAY_ADDRESS`` is used (both the
dashboard URL, as for ``ray job submit``), else the head `gpufleet up` recorded. Only a head that `gpufleet
up` started on this machine shares this machine's disk; every other one is remote, and what a job needs
travels with it (``gpufleet.jobs.upload``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import GpufleetError, fix
from gpufleet.cluster.head import HeadState, load_state

ALWAYS_FORWARDED = ("HF_TOKEN",)
ADDRESS_HELP = ("The cluster's dashboard URL (http://HEAD:8265), as for `ray job submit`; default: RAY_ADDRESS, "
                "else the head `gpufleet up` recorded.")


class Endpoint(Config):
    """A cluster as a client sees it."""

    dashboard_url: str = Field(description="Base URL of the dashboard and its job and Serve APIs.")
    token: str | None = Field(default=None, repr=False, description="Ray auth token, when the head wants one.")
    shares_disk: bool = Field(default=False, description=(
        "True only for a head `gpufleet up` started on this machine: its jobs can read this machine's paths."))

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def run_short_job(self, entrypoint: str, metadata: dict[str, str], timeout_s: float = 300) -> tuple[str, str, str]:
        """Run a short job on the cluster (an operation this machine has no driver connection for) and wait
        for it: (submission id, final status, its log)."""
        client = self.job_client()
        sid = client.submit_job(entrypoint=entrypoint, metadata=metadata)
        status = wait_for_end(client, sid, timeout_s)
        if status not in TERMINAL_STATES:
            client.stop_job(sid)
            raise GpufleetError(fix(f"job {sid} ({entrypoint}) did not finish within {timeout_s:g}s",
                                    f"see `gpufleet jobs logs {sid}` (the cluster may be busy)"))
        return sid, status, client.get_job_logs(sid)

    def job_client(self) -> Any:
        """Ray's Job Submission client for this cluster; unreachable heads fail in one line."""
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self.dashboard_url, headers=self.headers())
        except Exception as e:  # ConnectionError, or Ray's RuntimeError around it
            raise GpufleetError(fix(f"cannot reach the cluster's job API at {self.dashboard_url}: {_first_line(e)}",
                                    "check --address / RAY_ADDRESS (the dashboard URL, e.g. http://HEAD:8265) "
                                    "and that the head is up")) from None


TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def wait_for_end(client: Any, sid: str, timeout_s: float, poll_s: float = 0.3) -> str:
    """Poll a job's status until it ends or ``timeout_s`` passes; returns the last status seen."""
    import time

    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(sid).value)) not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(poll_s)
    return status


def forwarded_env(names: list[str], field: str = "env") -> dict[str, str]:
    """HF_TOKEN (when set) and each named variable, from this machine's environment, for a job's runtime env:
    secrets reach the cluster without being written into a file that is uploaded."""
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise GpufleetError(fix(f"{field}: {', '.join(missing)} not set in this environment",
                                f"export {missing[0]}=... before submitting, or remove it from {field}"))
    return {n: os.environ[n] for n in dict.fromkeys((*ALWAYS_FORWARDED, *names)) if os.environ.get(n)}


def dashboard_url(address: str) -> str:
    """``host:port`` or a URL -> a URL (Ray's job CLI takes both)."""
    return address if "://" in address else f"http://{address}"


def _env_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).expanduser().read_text().strip() if path and Path(path).expanduser().is_file() else None


def from_head(head: HeadState) -> Endpoint:
    token = Path(head.token_path).read_text().strip() if head.token_path else None
    return Endpoint(dashboard_url=head.dashboard_url, token=token, shares_disk=bool(head.head_id))


def resolve_endpoint(address: str | None = None) -> Endpoint:
    """``--address``, else ``RAY_ADDRESS``, else the recorded head; the error says how to name one."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if address.startswith("ray://") or address == "auto":
            raise GpufleetError(fix(f"--address {address} is a Ray client / GCS address",
                                    "pass the dashboard URL, e.g. http://HEAD:8265 (the job API listens there)"))
        head = load_state()
        if head and dashboard_url(address).rstrip("/") == head.dashboard_url.rstrip("/"):
            return from_head(head)
        return Endpoint(dashboard_url=dashboard_url(address), token=_env_token())
    head = load_state()
    if head is None:
        raise GpufleetError(fix("no cluster named: no --address, no RAY_ADDRESS and no head recorded",
                                "pass --address http://HEAD:8265, set RAY_ADDRESS, or run `gpufleet up`"))
    return from_head(head)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def serve_applications(endpoint: Endpoint) -> dict[str, Any]:
    """Name -> Ray Serve's account of each application (status, message, route, deployments), from the
    dashboard's Serve API; {} when Serve is not running there."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{endpoint.dashboard_url.rstrip('/')}/api/serve/applications/",
                                 headers=endpoint.headers())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}").get("applications") or {}
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise GpufleetError(fix(f"cannot read Serve's applications at {endpoint.dashboard_url}: {_first_line(e)}",
                                "check --address / RAY_ADDRESS and that the head is up")) from None
