# The gpufleet node image, for cluster.yaml's nodes and KubeRay pods: the Ray LLM image of the pinned
# Ray (with the vLLM that Ray pins) plus gpufleet at this version, built from this repository.
#   make image    # docker build --build-arg RAY_VERSION=<the node pin> -t ghcr.io/gpufleet/gpufleet:<version> .
# The pins live in pyproject.toml's `node` and `vllm` extras; tests/test_image.py checks this file against them.
ARG RAY_VERSION=2.60.0

FROM python:3.11-slim AS wheel
COPY . /src
RUN pip install --no-cache-dir build && python -m build --wheel --outdir /dist /src

FROM rayproject/ray-llm:${RAY_VERSION}-py311-cu128
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir "$(ls /tmp/dist/gpufleet-*.whl)[node,vllm]" && rm -rf /tmp/dist
