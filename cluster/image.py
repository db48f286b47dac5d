"""The node image: what every cluster node and KubeRay pod runs, tagged with gpufleet's own version.

The versions a node needs are written once, as the pins of the package's ``node`` and ``vllm`` extras
(pyproject.toml). They are read back here from the installed package's metadata, so the Dockerfile's base
image (checked by a test), the KubeRay manifests' ``rayVersion`` and the image tag cannot drift from what
``pip install gpufleet[node,vllm]`` installs.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import requires, version

from packaging.requirements import Requirement

IMAGE_REPOSITORY = "ghcr.io/gpufleet/gpufleet"
# rayproject/ray-llm's tag suffix: the Python and CUDA of the image the node image builds on.
BASE_IMAGE_FLAVOUR = "py311-cu128"
NODE_EXTRAS = ("node", "vllm")


def gpufleet_version() -> str:
    return version("gpufleet")


@cache
def node_pins() -> dict[str, str]:
    """Distribution -> exact version a cluster node runs (the ``==`` pins of the node extras)."""
    pins: dict[str, str] = {}
    for line in requires("gpufleet") or []:
        req = Requirement(line)
        if req.marker and any(req.marker.evaluate({"extra": e}) for e in NODE_EXTRAS):
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact:
                pins[req.name] = exact[0]
    return pins


def ray_version() -> str:
    return node_pins()["ray"]


def base_image() -> str:
    """The Ray LLM image (Ray and the vLLM that Ray version pins) the node image starts from."""
    return f"rayproject/ray-llm:{ray_version()}-{BASE_IMAGE_FLAVOUR}"


def default_image() -> str:
    """The gpufleet node image of this version (``make image`` builds it)."""
    return f"{IMAGE_REPOSITORY}:{gpufleet_version()}"
