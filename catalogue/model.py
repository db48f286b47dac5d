"""ModelSpec: the shapes of a decoder-only LLM, read from its Hugging Face ``config.json``.

No weights, no downloads, no torch: the parameter count is computed from the shapes and must
equal what ``transformers`` builds from the same config (tests check this per family).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import SpecError, fix
from gpufleet.catalogue.quantization import Quantization, read_quantization
from gpufleet.catalogue.vision import MULTIMODAL, extra_params

MODELS_DIR = Path(__file__).parent / "models"

# model_type -> family layout. A layout decides which weights exist and which activations
# autograd keeps; all sizes come from the config.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "llama",
    "qwen2_moe": "llama",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    # language models inside multimodal checkpoints (vision towers: vision.py)
    "mllama_text_model": "llama",
    "qwen2_vl": "llama",
    "qwen2_vl_text": "llama",
}
BIASED_QKV = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_vl_text"}  # q/k/v projections carry a bias in these

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}



class ModelSpec(Config):
    """Shapes of one decoder-only transformer, everything the memory model needs."""

    name: str = Field(description="Built-in name or the config's path.")
    model_type: str = Field(description="Hugging Face model_type, e.g. 'llama'.")
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="Dense MLP width.")
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    max_position_embeddings: int = Field(default=4096, gt=0)
    # Sliding-window attention: the window in tokens and which layers use it.
    sliding_window: int | None = Field(default=None, gt=0)
    sliding_layers: tuple[int, ...] = ()
    final_logit_softcapping: float | None = None
    # Mixture of experts (0 experts = dense).
    num_experts: int = Field(default=0, ge=0)
    experts_per_token: int = Field(default=0, ge=0)
    moe_intermediate_size: int = Field(default=0, ge=0)
    shared_expert_intermediate_size: int = Field(default=0, ge=0)
    moe_layers: tuple[int, ...] = ()
    quantization: Quantization | None = Field(default=None, description="The checkpoint's quantization_config.")
    multimodal: str | None = Field(default=None, description="Outer model_type of a vision-language checkpoint.")
    extra_params: int = Field(default=0, ge=0, description=(
        "Parameters outside the text decoder: a vision tower and projector (kept in half precision)."))

    @model_validator(mode="after")
    def _check_heads(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts):
            raise ValueError(
                f"num_experts_per_tok={self.experts_per_token} must be in 1..num_experts={self.num_experts}"
            )
        return self

    # ---- derived shapes -------------------------------------------------------------
    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_qk_norm(self) -> bool:
        return self.family in ("qwen3", "gemma3")

    @property
    def norms_per_layer(self) -> int:
        return 4 if self.family in ("gemma2", "gemma3") else 2

    # ---- parameter counts -----------------------------------------------------------
    def attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.q_dim, self.kv_dim
        n = h * q + 2 * h * kv + q * h
        if self.model_type in BIASED_QKV:
            n += q + 2 * kv
        if self.has_qk_norm:
            n += 2 * self.head_dim
        return n

    def dense_mlp_params(self, width: int | None = None) -> int:
        return 3 * self.hidden_size * (width or self.intermediate_size)

    def moe_mlp_params(self) -> int:
        h = self.hidden_size
        n = h * self.num_experts + self.num_experts * self.dense_mlp_params(self.moe_intermediate_size)
        if self.shared_expert_intermediate_size:
            n += self.dense_mlp_params(self.shared_expert_intermediate_size) + h  # + shared gate
        return n

    def layer_params(self, layer: int) -> int:
        mlp = self.moe_mlp_params() if layer in self.moe_layers else self.dense_mlp_params()
        return self.attention_params() + mlp + self.norms_per_layer * self.hidden_size

    def layer_linears(self, layer: int) -> list[tuple[int, int]]:
        """``(in_features, weights)`` of each linear weight in one decoder layer that quantizers
        convert: attention and MLP projections and the experts (routers stay in half precision)."""
        h, q, kv = self.hidden_size, self.q_dim, self.kv_dim
        attn = [(h, h * (q + 2 * kv))] if self.family == "phi3" else [(h, h * q), (h, h * kv), (h, h * kv)]
        out = [*attn, (q, q * h)]

        def mlp(width: int) -> list[tuple[int, int]]:
            return [(h, 2 * h * width), (width, width * h)]

        if layer in self.moe_layers:
            out += mlp(self.moe_intermediate_size) * self.num_experts
            if self.shared_expert_intermediate_size:
                out += mlp(self.shared_expert_intermediate_size)
        else:
            out += mlp(self.intermediate_size)
        return out

    def layer_tensors(self, layer: int) -> list[int]:
        """Element counts of one decoder layer's parameter tensors, one per ``nn.Parameter`` as the
        Hugging Face modules hold them (experts counted as separate projections)."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        out = [h * (q + 2 * kv)] if self.family == "phi3" else [h * q, h * kv, h * kv]
        out.append(q * h)
        if self.model_type in BIASED_QKV:
            out += [q, kv, kv]
        if self.has_qk_norm:
            out += [self.head_dim, self.head_dim]

        def mlp(width: int) -> list[int]:
            return [2 * h * width, width * h] if self.family == "phi3" else [h * width] * 3

        if layer in self.moe_layers:
            out.append(h * self.num_experts)
            out += mlp(self.moe_intermediate_size) * self.num_experts
            if self.shared_expert_intermediate_size:
                out += [*mlp(self.shared_expert_intermediate_size), h]
        else:
            out += mlp(i)
        return out + [h] * self.norms_per_layer

    def parameter_tensors(self) -> list[int]:
        """Element counts of every parameter tensor (``[p.numel() for p in model.parameters()]``)."""
        out = [self.embedding_params] * (1 if self.tie_word_embeddings else 2) + [self.hidden_size]
        out += [n for layer in range(self.num_layers) for n in self.layer_tensors(layer)]
        return out + ([self.extra_params] if self.extra_params else [])

    def layer_bytes(self, layer: int, dtype_bytes: float, quant: Quantization | None = None) -> float:
        """Weight bytes of one decoder layer, its linears quantized by ``quant`` (default: the checkpoint's)."""
        quant = quant or self.quantization
        total = self.layer_params(layer) * dtype_bytes
        if quant:
            total -= sum(n * (dtype_bytes - quant.bytes_per_weight(fan_in)) for fan_in, n in self.layer_linears(layer))
        return total

    def linear_bytes_per_weight(self, quant: Quantization) -> float:
        """Average bytes of one quantized linear weight over the decoder layers (scales included)."""
        linears = [lin for i in range(self.num_layers) for lin in self.layer_linears(i)]
        return sum(n * quant.bytes_per_weight(fan_in) for fan_in, n in linears) / sum(n for _, n in linears)

    def weight_bytes(self, dtype_bytes: float, quant: Quantization | None = None) -> int:
        """Bytes of all weights: decoder layers (quantized where the checkpoint or ``quant`` says),
        embeddings, the LM head and the final norm in ``dtype_bytes``."""
        outside = self.num_params - sum(self.layer_params(i) for i in range(self.num_layers))
        return int(sum(self.layer_bytes(i, dtype_bytes, quant) for i in range(self.num_layers))
                   + outside * dtype_bytes)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Total parameters, as ``sum(p.numel() for p in model.parameters())`` counts them."""
        n = sum(self.layer_params(i) for i in range(self.num_layers))
        n += self.embedding_params * (1 if self.tie_word_embeddings else 2) + self.hidden_size
        return n + self.extra_params

    @property
    def active_params(self) -> int:
        """Parameters touched per token (MoE: routed experts only); drives FLOPs."""
        if not self.is_moe:
            return self.num_params
        per_expert = self.dense_mlp_params(self.moe_intermediate_size)
        idle = (self.num_experts - self.experts_per_token) * per_expert
        return self.num_params - idle * len(self.moe_layers)

    @property
    def mlp_activation_width(self) -> int:
        """MLP width one token actually passes through (MoE: k experts plus the shared one)."""
        if not self.is_moe:
            return self.intermediate_size
        dense_frac = 1 - len(self.moe_layers) / self.num_layers
        moe = self.experts_per_token * self.moe_intermediate_size + self.shared_expert_intermediate_size
        return round(dense_frac * self.intermediate_size + (1 - dense_frac) * moe)

    # ---- KV cache -------------------------------------------------------------------
    def kv_tokens_per_layer(self, context: int) -> list[int]:
        """Tokens of KV cache each layer keeps for one sequence of ``context`` tokens."""
        w = self.sliding_window
        return [min(context, w) if (w and i in self.sliding_layers) else context for i in range(self.num_layers)]

    def check_context(self, tokens: int, field: str = "seq_len") -> int:
        """``tokens`` if one sequence that long fits the model's positions, else a one-line error."""
        if tokens > self.max_position_embeddings:
            raise SpecError(fix(f"{field}={tokens} exceeds the model's max_position_embeddings="
                                f"{self.max_position_embeddings}", f"set {field} <= {self.max_position_embeddings}"))
        return tokens

    def summary(self) -> str:
        moe = f", {self.num_experts} experts top-{self.experts_per_token}" if self.is_moe else ""
        if self.multimodal:
            moe += f", {self.multimodal} with {self.extra_params / 1e9:.2f}B outside the text decoder"
        return (f"{self.name}: {self.model_type}, {self.num_params / 1e9:.2f}B params, {self.num_layers} layers, "
                f"hidden {self.hidden_size}, heads {self.num_heads}/{self.num_kv_heads}{moe}")


# ---- reading config.json --------------------------------------------------------------
def _require(cfg: dict[str, Any], key: str, source: str) -> int:
    if cfg.get(key) is None:
        raise SpecError(fix(f"{source}: config.json has no '{key}'",
                            f"add '{key}' (a Hugging Face causal-LM config needs it)"))
    return _int(cfg, key, source)


def _int(cfg: dict[str, Any], key: str, source: str) -> int:
    """A positive whole number from the config, or a one-line error naming the key."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(fix(f"{source}: config.json has {key}={value!r}", f"set '{key}' to a positive integer"))
    return value


def _optional_int(cfg: dict[str, Any], key: str, source: str) -> int | None:
    return None if cfg.get(key) is None else _int(cfg, key, source)


def _sliding_layers(cfg: dict[str, Any], n_layers: int) -> tuple[int, ...]:
    mt = cfg["model_type"]
    if cfg.get("layer_types"):
        return tuple(i for i, t in enumerate(cfg["layer_types"]) if t == "sliding_attention")
    if not cfg.get("sliding_window"):
        return ()
    if mt == "gemma2":  # even layers slide, odd layers attend globally
        return tuple(i for i in range(n_layers) if (i + 1) % 2)
    if mt == "gemma3_text":
        pattern = cfg.get("sliding_window_pattern", 6)
        return tuple(i for i in range(n_layers) if (i + 1) % pattern)
    if mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        if not cfg.get("use_sliding_window"):
            return ()
        start = cfg.get("max_window_layers", n_layers)
        return tuple(range(start, n_layers))
    return tuple(range(n_layers))  # mistral-style: every layer slides


def _moe_layers(cfg: dict[str, Any], n_layers: int) -> tuple[int, ...]:
    mt = cfg["model_type"]
    if mt == "mixtral":
        return tuple(range(n_layers))
    if mt in ("qwen2_moe", "qwen3_moe"):
        step = cfg.get("decoder_sparse_step", 1) or 1
        dense = set(cfg.get("mlp_only_layers") or [])
        return tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0)
    return ()


def spec_from_config(cfg: dict[str, Any], name: str = "custom") -> ModelSpec:
    """Build a ModelSpec from a parsed config.json (dict).

    Reads ``torch_dtype`` or ``dtype``, tied embeddings, ``head_dim`` when given, sliding-window
    layers and MoE experts. Multimodal configs that nest the LM under ``text_config`` are unwrapped.
    """
    if not isinstance(cfg, dict):
        raise SpecError(fix(f"{name}: config.json holds a {type(cfg).__name__}, not an object of keys",
                            "pass a Hugging Face config.json (a JSON object)"))
    raw = cfg
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise SpecError(fix(f"{name}: unsupported model_type {mt!r}",
                            f"use a config of one of: {', '.join(sorted(FAMILIES))}"))
    h = _require(cfg, "hidden_size", name)
    n_heads = _require(cfg, "num_attention_heads", name)
    n_layers = _require(cfg, "num_hidden_layers", name)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    if dtype not in DTYPE_BYTES:
        raise SpecError(fix(f"{name}: config.json has torch_dtype={dtype!r}", f"use one of: {', '.join(DTYPE_BYTES)}"))
    n_kv = _optional_int(cfg, "num_key_value_heads", name) or n_heads  # absent: full multi-head attention
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    tie_default = mt in ("gemma2", "gemma3_text")
    quantization = read_quantization(raw, name)
    try:
        return ModelSpec(
            name=name,
            model_type=mt,
            hidden_size=h,
            intermediate_size=_require(cfg, "intermediate_size", name),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=_optional_int(cfg, "head_dim", name) or h // n_heads,
            vocab_size=_require(cfg, "vocab_size", name),
            tie_word_embeddings=cfg.get("tie_word_embeddings", tie_default),
            torch_dtype=dtype,
            max_position_embeddings=_optional_int(cfg, "max_position_embeddings", name) or 4096,
            sliding_window=cfg.get("sliding_window") or None,
            sliding_layers=_sliding_layers(cfg, n_layers),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            num_experts=n_experts,
            experts_per_token=cfg.get("num_experts_per_tok", 0) if n_experts else 0,
            moe_intermediate_size=(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) if n_experts else 0,
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
            moe_layers=_moe_layers(cfg, n_layers) if n_experts else (),
            quantization=quantization,
            multimodal=raw.get("model_type") if raw.get("model_type") in MULTIMODAL else None,
            extra_params=extra_params(raw, h),
        )
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise SpecError(fix(f"{name}: invalid {where}: {err['msg']}",
                            "correct that value in config.json")) from None


@cache
def builtin_models() -> dict[str, Path]:
    """Built-in model names (public config.json values shipped with gpufleet) -> their files."""
    return {p.stem: p for p in sorted(MODELS_DIR.glob("*.json"))}


def builtin_name(name: str) -> str | None:
    """The built-in model ``name`` spells, in any case (``Llama-3.1-8B`` is ``llama-3.1-8b``), or None."""
    return name if name in builtin_models() else next((b for b in builtin_models() if b == name.lower()), None)


def load_config(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    """Resolve a built-in name, a config.json path or a model directory to (name, config dict)."""
    key = str(name_or_path)
    if builtin := builtin_name(key):
        return builtin, json.loads(builtin_models()[builtin].read_text())
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        import difflib

        near = difflib.get_close_matches(key.lower(), list(builtin_models()), n=1, cutoff=0.6)
        raise SpecError(fix(f"model {key!r} is neither a built-in name nor a config.json path",
                            f"did you mean {near[0]}?" if near else
                            f"pass a path to config.json or one of: {', '.join(builtin_models())}"))
    try:
        return key, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(fix(f"{path}: not valid JSON ({e.msg} at line {e.lineno})",
                            "pass the model's config.json")) from None


def load_model(name_or_path: str | Path) -> ModelSpec:
    """The ModelSpec of a built-in name, a config.json path or a model directory."""
    name, cfg = load_config(name_or_path)
    return spec_from_config(cfg, name=name)
