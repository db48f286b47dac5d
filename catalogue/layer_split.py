"""Splitting a model's layers over the GPUs of one process: transformers' ``device_map`` and
TransformerLens's ``n_devices``.

``device_split`` balances the layers so the fullest GPU is as empty as it can be (each GPU holds its
layers' weights and KV cache, every GPU runs the prefill transient, the LM head's GPU the logits)
and gives the ``max_memory`` that makes accelerate's ``infer_auto_device_map`` produce exactly that
split: a GPU's budget is its layers' bytes plus half a layer of slack, and GPU 0 also keeps room for
the largest remaining module (accelerate reserves it on the first GPU for offloading). Module names
are transformers' own for the causal-LM classes gpufleet reads (``model.embed_tokens``,
``model.layers.N``, ``model.norm``, ``model.rotary_emb``, ``lm_head``).
"""

from __future__ import annotations

from pydantic import Field

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.memory import MemoryBreakdown, fits
from gpufleet.catalogue.model import ModelSpec
from gpufleet.catalogue.quantization import Quantization

MIB = 2**20


class LayerSplit(Config):
    """Which GPU holds which module, and what each GPU peaks at."""

    device_map: dict[str, int] = Field(description="Module name -> GPU index, for from_pretrained(device_map=...).")
    max_memory: dict[int, int] = Field(description="GPU index -> bytes of weights accelerate may place there.")
    layers_per_gpu: list[int]
    weights_per_gpu: list[int]
    peak_per_gpu: list[int] = Field(description="Predicted allocator peak per GPU (CUDA context not included).")

    def emit(self) -> dict[str, object]:
        """The JSON a user pastes: ``from_pretrained(path, device_map=d["device_map"],
        max_memory={int(k): v for k, v in d["max_memory"].items()})``."""
        return {"device_map": self.device_map,
                "max_memory": {str(k): f"{-(-v // MIB)}MiB" for k, v in self.max_memory.items()}}


class Runtime(Config):
    """What a generate() adds to the weights: per-layer KV bytes, the transient every GPU sees,
    the logits on the LM head's GPU."""

    kv_per_layer: list[int]
    transient: int
    logits: int


def generate_runtime(spec: ModelSpec, mem: MemoryBreakdown, batch: int, prompt: int, new_tokens: int,
                     dtype_bytes: int) -> Runtime:
    """The runtime of ``generate_memory``'s peak moment, the KV cache broken down by layer."""
    per_token = 2 * spec.kv_dim * dtype_bytes
    if mem.peak_phase == "prefill":
        tokens = [prompt] * spec.num_layers
    else:
        tokens = spec.kv_tokens_per_layer(prompt + new_tokens)
    return Runtime(kv_per_layer=[batch * t * per_token for t in tokens], transient=mem.activations,
                   logits=mem.logits_and_loss)


def device_split(spec: ModelSpec, n: int, runtime: Runtime, dtype_bytes: int, gpu_bytes: int, headroom: float,
                 quant: Quantization | None = None) -> LayerSplit | None:
    """The balanced contiguous split of the layers over ``n`` GPUs, or None if it does not fit."""
    layer_w = [int(spec.layer_bytes(i, dtype_bytes, quant)) for i in range(spec.num_layers)]
    kv = runtime.kv_per_layer
    tied = spec.tie_word_embeddings
    embed = spec.embedding_params * dtype_bytes
    head = 0 if tied else embed  # a tied head shares GPU 0's embedding (and its logits land there)
    norm = spec.hidden_size * dtype_bytes
    # the final norm, the head and, untied, the logits go with the last layer
    tail = norm + head + (0 if tied else runtime.logits)
    first = embed + runtime.transient + (runtime.logits if tied else 0)

    def fill(cap: int) -> list[list[int]] | None:
        """Greedy, in layer order: each GPU takes layers while its peak stays under ``cap``."""
        groups: list[list[int]] = [[] for _ in range(n)]
        g, used = 0, first
        for i in range(spec.num_layers):
            need = layer_w[i] + kv[i] + (tail if i == spec.num_layers - 1 else 0)
            while used + need > cap:
                g += 1
                if g == n:
                    return None
                used = runtime.transient
            groups[g].append(i)
            used += layer_w[i] + kv[i]
        return groups

    lo, hi = 0, first + sum(layer_w) + sum(kv) + tail
    while lo < hi:  # the smallest cap the greedy fill meets: the most even split
        mid = (lo + hi) // 2
        if fill(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    groups = fill(hi)
    if groups is None:
        return None
    last = max(g for g in range(n) if groups[g])
    weights, peaks, device_map = [], [], {"model.embed_tokens": 0}
    for g in range(n):
        w = sum(layer_w[i] for i in groups[g]) + (embed if g == 0 else 0) + (norm + head if g == last else 0)
        logits = runtime.logits if g == (0 if tied else last) else 0
        weights.append(w)
        peaks.append(w + sum(kv[i] for i in groups[g]) + runtime.transient + logits)
        device_map.update({f"model.layers.{i}": g for i in groups[g]})
    device_map.update({"model.norm": last, "model.rotary_emb": last, "lm_head": 0 if tied else last})
    if not all(fits(p, gpu_bytes, headroom) for p in peaks):
        return None
    slack = min(layer_w) // 2
    reserve = max(max(layer_w), head)  # accelerate keeps the largest remaining module free on GPU 0
    max_memory = {g: weights[g] + slack + (reserve if g == 0 else 0) for g in range(n)}
    return LayerSplit(device_map=device_map, max_memory=max_memory, layers_per_gpu=[len(x) for x in groups],
                      weights_per_gpu=weights, peak_per_gpu=peaks)


# ---- TransformerLens ---------------------------------------------------------------------------
TL_DTYPES = {"float32": 4, "bfloat16": 2}  # HookedTransformer's default dtype, and the usual override


class TransformerLensSplit(Config):
    """``HookedTransformer.from_pretrained(..., n_devices=N, dtype=...)``: block i on GPU
    ``i // (n_layers // N)``; the embedding on GPU 0, the final norm and unembedding with the last block."""

    dtype: str
    n_devices: int
    layers_per_gpu: list[int]
    weights_per_gpu: list[int]


def transformerlens_split(spec: ModelSpec, dtype: str, gpu_bytes: int, headroom: float,
                          max_devices: int) -> TransformerLensSplit | None:
    """The fewest ``n_devices`` whose even split (TransformerLens's rule) fits the GPUs' memory."""
    b = TL_DTYPES[dtype]
    layer_w = [spec.layer_params(i) * b for i in range(spec.num_layers)]
    embed = spec.embedding_params * b
    unembed = embed + spec.hidden_size * b  # TransformerLens always holds its own W_U
    for n in range(1, max_devices + 1):
        per = spec.num_layers // n
        if per == 0 or (spec.num_layers - 1) // per >= n:
            continue  # TransformerLens would put the last blocks on a GPU index >= n_devices
        weights = [0] * n
        counts = [0] * n
        for i, w in enumerate(layer_w):
            weights[i // per] += w
            counts[i // per] += 1
        weights[0] += embed
        weights[(spec.num_layers - 1) // per] += unembed
        if all(fits(w, gpu_bytes, headroom) for w in weights):
            return TransformerLensSplit(dtype=dtype, n_devices=n, layers_per_gpu=counts, weights_per_gpu=weights)
    return None
