"""gpufleet serving: a validated serve spec turned into a Ray Serve LLM app (vLLM, OpenAI API)."""

from gpufleet.serve_apps.app import build_app, deploy, emit_config
from gpufleet.serve_apps.spec import ModelEntry, ServeSpec, load_serve_spec

__all__ = ["ModelEntry", "ServeSpec", "build_app", "deploy", "emit_config", "load_serve_spec"]
