"""A serve app on a cluster whose head does not share this machine's disk: staged here, deployed there.

``gpufleet serve SPEC --address URL`` checks and plans the spec here, then submits a Ray job whose working
directory holds only ``spec.yaml`` (and the config.json of a bucket model); on the cluster that job runs
``python -m gpufleet.serve_apps.remote deploy spec.yaml``, which is what `gpufleet serve` does on a local
head (``gpufleet.serve_apps.app.deploy``). ``gpufleet apps delete NAME`` runs ``... remote delete NAME`` the
same way. Models must be reachable from the nodes (built-in name, Hub repo id, s3:// or gs://); secrets
(HF_TOKEN, api_key_env, the spec's env) travel in the job's runtime env and reach every replica from there.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml

from gpufleet.catalogue.errors import GpufleetError, SpecError, fix
from gpufleet.catalogue.sources import REMOTE_SCHEMES, is_uri, model_source, resolve
from gpufleet.cluster.endpoint import forwarded_env
from gpufleet.serve_apps.spec import ServeSpec

SPEC_FILE = "spec.yaml"
FORWARDED_NAMES_ENV = "GPUFLEET_FORWARDED_ENV"  # which of the job's variables the replicas get


def check_reachable(spec: ServeSpec, base: Path) -> list[str]:
    """Refuse models and adapters that only this machine's disk holds; returns each model's source."""
    if spec.storage and not is_uri(spec.storage) and not Path(spec.storage).is_absolute():
        raise SpecError(fix(f"storage: {spec.storage} is a folder relative to this machine's spec, which the "
                            "cluster's nodes cannot read", "use s3:// / gs:// or an absolute path every node mounts"))
    sources = []
    for entry in spec.models:
        field = f"models[{entry.id}]"
        source, _ = model_source(entry.source, base, f"{field}.source", entry.config)  # plannable here
        if Path(source).is_absolute():
            raise SpecError(fix(f"{field}.source: {entry.source} is a directory on this machine, which the "
                                "cluster's nodes cannot read", "use a built-in name, a Hugging Face repo id, or "
                                "s3:// / gs:// (with config:)"))
        local = [p for p in [*entry.adapters.values(), entry.adapters_dir or "s3://"] if not is_uri(p)]
        if local:
            raise SpecError(fix(f"{field}: adapters at {local[0]} are on this machine, which the cluster's nodes "
                                "cannot read", "set adapters_dir: to the storage URI the fine-tune wrote to"))
        sources.append(source)
    return sources


def stage_serve(spec: ServeSpec, base: Path, into: Path) -> dict[str, str]:
    """Write the app's job directory ``into`` after checking every model is reachable from the cluster's
    nodes; returns the job's environment (the forwarded secrets, and the list of their names)."""
    data = spec.model_dump(exclude_defaults=True)
    into.mkdir(parents=True, exist_ok=True)
    for i, (entry, source) in enumerate(zip(spec.models, check_reachable(spec, base), strict=True)):
        if source.startswith(REMOTE_SCHEMES):  # planned from a local config.json: it travels with the job
            name = f"{entry.id}.config.json"
            shutil.copy2(resolve(base, entry.config or ""), into / name)
            data["models"][i]["config"] = name
    (into / SPEC_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    env = replica_env(spec)
    return {**env, FORWARDED_NAMES_ENV: ",".join(env)}


def replica_env(spec: ServeSpec) -> dict[str, str]:
    """What every replica gets from the deploying machine's environment: HF_TOKEN, the spec's ``env`` names and
    ``api_key_env``, as set here now (a local head started earlier does not have them)."""
    return forwarded_env([*spec.env, *([spec.api_key_env] if spec.api_key_env else [])])


def main(argv: list[str] | None = None) -> int:
    """``deploy SPEC`` or ``delete NAME``, on the cluster (the entrypoint of the jobs above)."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or args[0] not in ("deploy", "delete"):
        print("usage: python -m gpufleet.serve_apps.remote deploy SPEC.yaml | delete NAME", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    ray.init(logging_level="ERROR")
    try:
        if args[0] == "delete":
            serve.delete(args[1])
            print(f"deleted serve app {args[1]}", flush=True)
            return 0
        from gpufleet.serve_apps.app import deploy
        from gpufleet.serve_apps.spec import load_serve_spec

        spec, base = load_serve_spec(args[1])
        names = [n for n in os.environ.get(FORWARDED_NAMES_ENV, "").split(",") if n]
        url = deploy(spec, base, report=lambda line: print(line, flush=True),
                     env={n: os.environ[n] for n in names if n in os.environ})
    except GpufleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"serving {', '.join(m.id for m in spec.models)} at {url}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
