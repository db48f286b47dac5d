"""Quantized weights: what a checkpoint's ``quantization_config`` (or on-the-fly bitsandbytes) costs.

Only the decoder layers' linear weights are quantized (attention and MLP projections, experts);
embeddings, norms, routers and the LM head stay in the model's half precision, as AWQ, GPTQ,
bitsandbytes (transformers skips the output embedding), FP8 and compressed-tensors checkpoints
leave them. Bytes per quantized weight = bits/8 + its share of the group's scale and zero point.
Checked on an H100 for bitsandbytes int8 and nf4 (bench/memory/results/h100-quantized.json).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import SpecError, fix

Method = Literal["awq", "gptq", "bitsandbytes", "fp8", "compressed-tensors"]
METHODS: tuple[str, ...] = Method.__args__
OnTheFly = Literal["none", "int8", "nf4"]
BNB_BLOCK = 64  # bitsandbytes 4-bit: one fp32 absmax per 64 weights
BNB_DOUBLE_QUANT_BLOCK = 256  # double quantization: absmax in 8 bits, one fp32 per 256 of them


class Quantization(Config):
    """How a model's linear weights are stored."""

    method: Method
    bits: int = Field(ge=1, le=16, description="Bits per quantized weight.")
    group_size: int | None = Field(default=None, ge=1, description=(
        "Weights sharing one scale (None: one scale per output channel)."))
    scale_bytes: float = Field(default=2, description="Bytes of one scale (fp16 for AWQ/GPTQ, fp32 for bitsandbytes).")
    zero_point: bool = Field(default=False, description="Whether each group also stores a zero point of `bits` bits.")
    double_quant: bool = Field(default=False, description="bitsandbytes 4-bit: absmax quantized again.")

    @property
    def label(self) -> str:
        if self.method == "bitsandbytes":
            return "int8" if self.bits == 8 else "nf4"
        return f"{self.method} {self.bits}-bit" + (f" g{self.group_size}" if self.group_size else "")

    def bytes_per_weight(self, in_features: int) -> float:
        """Bytes of one quantized weight of a linear layer with ``in_features`` inputs (scales included)."""
        group = self.group_size or in_features  # per output channel: one scale for the whole row
        if self.method == "bitsandbytes" and self.bits == 4:
            if self.double_quant:
                return 0.5 + 1 / BNB_BLOCK + 4 / (BNB_BLOCK * BNB_DOUBLE_QUANT_BLOCK)
            return 0.5 + 4 / BNB_BLOCK
        zero = self.bits / 8 if self.zero_point else 0
        return self.bits / 8 + (self.scale_bytes + zero) / group


def bitsandbytes(kind: OnTheFly) -> Quantization | None:
    """The quantization transformers applies for ``BitsAndBytesConfig(load_in_8bit=True)`` (int8: one
    fp32 scale per output row) or ``load_in_4bit=True, bnb_4bit_quant_type='nf4'`` (no double quant)."""
    if kind == "none":
        return None
    if kind == "int8":
        return Quantization(method="bitsandbytes", bits=8, scale_bytes=4)
    return Quantization(method="bitsandbytes", bits=4, group_size=BNB_BLOCK, scale_bytes=4)


FP8 = Quantization(method="fp8", bits=8, scale_bytes=4)  # per-tensor scale: negligible


def read_quantization(cfg: dict[str, Any], source: str) -> Quantization | None:
    """The ``quantization_config`` of a config.json, or None; an unknown method or a bad value is one line."""
    try:
        return _read(cfg, source)
    except ValidationError as e:
        err = e.errors()[0]
        raise SpecError(fix(f"{source}: quantization_config has an invalid {'.'.join(map(str, err['loc']))}: "
                            f"{err['msg']}", "correct it in config.json")) from None


def _read(cfg: dict[str, Any], source: str) -> Quantization | None:
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise SpecError(fix(f"{source}: quantization_config is a {type(qc).__name__}", "make it an object of keys"))
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method in ("awq", "gptq"):
        bits = qc.get("bits", qc.get("w_bit", 4))
        group = qc.get("group_size", qc.get("q_group_size", 128))
        # GPTQ also keeps g_idx (4 bytes per input feature per linear): under 0.1% of the weights, left out.
        return Quantization(method=method, bits=bits, group_size=None if group in (-1, None) else group,
                            zero_point=method == "gptq" or qc.get("zero_point", True))
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return bitsandbytes("int8")
        return bitsandbytes("nf4").model_copy(update={"double_quant": bool(qc.get("bnb_4bit_use_double_quant"))})
    if method == "fp8":
        block = qc.get("weight_block_size")
        return FP8 if not block else Quantization(method="fp8", bits=8, group_size=block[0] * block[1], scale_bytes=4)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, source)
    raise SpecError(fix(f"{source}: quantization_config has quant_method={qc.get('quant_method')!r}",
                        f"gpufleet sizes {', '.join(METHODS)} checkpoints; use one of those"))


def _compressed_tensors(qc: dict[str, Any], source: str) -> Quantization:
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict) and g.get("weights")]
    if not groups:
        raise SpecError(fix(f"{source}: compressed-tensors quantization_config has no config_groups with weights",
                            "use the config.json the quantizer wrote"))
    w = groups[0]["weights"]
    strategy = w.get("strategy", "tensor")
    group = w.get("group_size") if strategy == "group" else None
    return Quantization(method="compressed-tensors", bits=w.get("num_bits", 8), group_size=group,
                        scale_bytes=2 if strategy == "group" else 4, zero_point=not w.get("symmetric", True))


def vllm_quantization(q: Quantization, compute_capability: tuple[int, int]) -> str:
    """vLLM's ``quantization`` argument for a checkpoint: the Marlin kernels for AWQ/GPTQ where the
    GPU has them (compute capability 8.0+), since naming plain ``awq``/``gptq`` forces the slow ones."""
    if q.method in ("awq", "gptq"):
        return f"{q.method}_marlin" if compute_capability >= (8, 0) else q.method
    return q.method
