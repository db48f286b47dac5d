"""What is running on the cluster: nodes, GPUs, placement groups, jobs, Serve apps, GPU metrics."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from gpufleet.catalogue.errors import GpufleetError, fix
from gpufleet.catalogue.placement import sum_bundles
from gpufleet.cluster.endpoint import Endpoint, serve_applications


class NodeStatus(BaseModel):
    node_id: str
    address: str
    alive: bool
    accelerator_type: str | None
    gpus_total: float
    gpus_free: float
    cpus_total: float
    cpus_free: float


class GroupStatus(BaseModel):
    id: str
    name: str
    state: str = Field(description="CREATED, PENDING (waiting), REMOVED, ...")
    strategy: str
    bundles: list[dict[str, float]]
    owner: str
    waiting_for: str = ""


class ClusterStatus(BaseModel):
    address: str
    dashboard_url: str | None
    nodes: list[NodeStatus]
    placement_groups: list[GroupStatus]
    jobs: list[dict[str, Any]]
    serve_apps: list[dict[str, Any]]
    gpu_metrics: list[dict[str, Any]]


def _accelerator(resources: dict[str, float]) -> str | None:
    return next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), None)


def collect_status(endpoint: Endpoint | None = None, address: str | None = None) -> ClusterStatus:
    """Snapshot of the connected cluster (``ray.init`` must have been called); jobs and Serve apps come from
    ``endpoint``'s APIs, when given."""
    import ray
    from ray._private.state import state

    free = state.available_resources_per_node()
    nodes = []
    for n in ray.nodes():
        res, avail = n["Resources"], free.get(n["NodeID"], {})
        nodes.append(NodeStatus(
            node_id=n["NodeID"], address=n["NodeManagerAddress"], alive=n["Alive"],
            accelerator_type=_accelerator(res), gpus_total=res.get("GPU", 0), gpus_free=avail.get("GPU", 0),
            cpus_total=res.get("CPU", 0), cpus_free=avail.get("CPU", 0)))
    jobs = _jobs(endpoint)
    return ClusterStatus(
        address=address or ray.get_runtime_context().gcs_address,
        dashboard_url=endpoint.dashboard_url if endpoint else None, nodes=nodes,
        placement_groups=_groups(jobs), jobs=jobs, serve_apps=_serve_apps(endpoint), gpu_metrics=_metrics())


def _groups(jobs: list[dict[str, Any]]) -> list[GroupStatus]:
    import ray

    by_job = {j.get("job_id"): j for j in jobs if j.get("job_id")}
    out = []
    for pg_id, g in ray.util.placement_group_table().items():
        if g["state"] == "REMOVED":
            continue
        bundles = [dict(b) for _, b in sorted(g["bundles"].items())]
        job_hex = pg_id[-8:]  # a placement group id ends with its creator's job id
        job = next((j for jid, j in by_job.items() if jid.endswith(job_hex)), None)
        owner = (f"job {job['submission_id']}" if job and job.get("submission_id")
                 else "serve app" if g["name"].startswith("SERVE") else g["name"] or f"driver {job_hex}")
        waiting = ""
        if g["state"] == "PENDING":
            sched = g.get("stats", {}).get("scheduling_state", "")
            waiting = f"{sum_bundles(bundles)} ({g['strategy']}, {sched.lower() or 'waiting'})"
        out.append(GroupStatus(id=pg_id, name=g["name"], state=g["state"], strategy=g["strategy"],
                               bundles=bundles, owner=owner, waiting_for=waiting))
    return out


def _jobs(endpoint: Endpoint | None) -> list[dict[str, Any]]:
    if endpoint is None:
        return []
    try:
        return [{"submission_id": j.submission_id, "job_id": j.job_id, "status": str(j.status.value),
                 "entrypoint": j.entrypoint, "message": j.message or ""}
                for j in endpoint.job_client().list_jobs() if j.submission_id]  # drivers (this CLI too) are not jobs
    except Exception as e:  # dashboard down: report, keep the rest of the status
        return [{"error": f"job API unreachable: {e}"}]


def _serve_apps(endpoint: Endpoint | None) -> list[dict[str, Any]]:
    if endpoint is None:
        return []
    try:
        apps = serve_applications(endpoint)
    except Exception:
        return []
    return [{"name": name, "status": a.get("status"), "route_prefix": a.get("route_prefix"),
             "deployments": {d: v.get("status") for d, v in (a.get("deployments") or {}).items()}}
            for name, a in apps.items()]


STATUS_MARK = "gpufleet-status: "  # the line of the status job's log that holds its JSON


def remote_status(endpoint: Endpoint, timeout_s: float = 120) -> ClusterStatus:
    """The status of a cluster this machine has no driver connection to: collected by a short job on it
    (``python -m gpufleet.cluster.status``), its jobs and Serve apps read here through ``endpoint``."""
    sid, _, logs = endpoint.run_short_job("python -m gpufleet.cluster.status", {"gpufleet": "status"}, timeout_s)
    line = next((x for x in logs.splitlines() if x.startswith(STATUS_MARK)), None)
    if line is None:
        raise GpufleetError(fix(f"the status job {sid} printed no status: {logs.strip()[-300:]}",
                                "check that gpufleet is installed on the cluster's nodes (the node image)"))
    st = ClusterStatus.model_validate_json(line.removeprefix(STATUS_MARK))
    jobs = [j for j in _jobs(endpoint) if j.get("submission_id") != sid]
    return st.model_copy(update={"dashboard_url": endpoint.dashboard_url, "jobs": jobs,
                                 "serve_apps": _serve_apps(endpoint)})


def _metrics() -> list[dict[str, Any]]:
    from gpufleet.cluster.monitor import monitor_reports

    try:
        return monitor_reports()
    except Exception as e:
        return [{"error": f"GPU monitors unreachable: {e}"}]


def main() -> int:
    """On the cluster: print the status of the cluster this job runs in (for ``remote_status``)."""
    import ray

    ray.init(logging_level="ERROR", log_to_driver=False)
    print(STATUS_MARK + collect_status().model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
