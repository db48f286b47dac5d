"""Vision towers of multimodal checkpoints: their parameter counts, from ``vision_config``.

A multimodal config nests (or, for Qwen2-VL, flattens) its language model, which ``model.py`` reads
as any decoder; what the text decoder does not hold is counted here, layer by layer as transformers
builds it (checked against ``AutoModelForImageTextToText.from_config`` on the meta device):

* ``llava``: a CLIP vision tower and a two-layer projector;
* ``qwen2_vl``: Qwen2-VL's ViT (a 3-D patch embedding, blocks, and the patch merger);
* ``mllama`` (Llama-3.2-Vision): the tiled ViT with its global layers and gated position
  embeddings, the projector, and in the text model 8 extra embedding rows plus each cross-attention
  layer's q/k norms and two gates.
"""

from __future__ import annotations

from typing import Any

MULTIMODAL = ("llava", "qwen2_vl", "mllama")


def _vit_layer(h: int, i: int, qkv_bias: bool = True) -> int:
    """One pre-norm ViT block: attention (q, k, v, out), two LayerNorms, a two-layer MLP with biases."""
    return 4 * h * h + (4 * h if qkv_bias else 0) + 2 * 2 * h + (h * i + i) + (i * h + h)


def _clip(v: dict[str, Any]) -> int:
    h, i, p, img = v.get("hidden_size", 768), v.get("intermediate_size", 3072), v.get("patch_size", 32), v.get(
        "image_size", 224)
    channels = v.get("num_channels", 3)
    embeddings = h + channels * h * p * p + ((img // p) ** 2 + 1) * h
    return embeddings + 2 * h + v.get("num_hidden_layers", 12) * _vit_layer(h, i) + 2 * h


def _llava(cfg: dict[str, Any], text_hidden: int) -> int:
    v = cfg["vision_config"]
    vh = v.get("hidden_size", 768)
    return _clip(v) + (vh * text_hidden + text_hidden) + (text_hidden * text_hidden + text_hidden)


def _qwen2_vl(cfg: dict[str, Any], text_hidden: int) -> int:
    v = cfg["vision_config"]
    e, heads_ratio = v.get("embed_dim", 1280), v.get("mlp_ratio", 4)
    merged = e * v.get("spatial_merge_size", 2) ** 2
    patch = v.get("in_chans", v.get("in_channels", 3)) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * e
    mlp = int(e * heads_ratio)
    block = 2 * 2 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * mlp + mlp) + (mlp * e + e)
    merger = 2 * e + (merged * merged + merged) + (merged * v.get("hidden_size", text_hidden) + v.get("hidden_size", text_hidden))
    return patch + v.get("depth", 32) * block + merger


def _mllama(cfg: dict[str, Any], text_hidden: int) -> int:
    v, t = cfg["vision_config"], cfg["text_config"]
    h, i = v.get("hidden_size", 1280), v.get("intermediate_size", 5120)
    p, img, tiles = v.get("patch_size", 14), v.get("image_size", 560), v.get("max_num_tiles", 4)
    ratios = len(v.get("supported_aspect_ratios") or [[1, 1]]) + 1  # ids 1..N, 0 = padding
    patches = (img // p) ** 2 + 1
    layer = 4 * h * h + 2 * 2 * h + (h * i + i) + (i * h + h)  # no attention biases
    vision = (v.get("num_channels", 3) * h * p * p + h  # patch conv, class embedding
              + 1 + patches * h + ratios * tiles * patches * h  # gated position + tile embeddings
              + 2 * (ratios * tiles * h + 1)  # pre- and post-tile position embeddings
              + 2 * 2 * h  # layernorm_pre, layernorm_post
              + v.get("num_hidden_layers", 32) * layer + v.get("num_global_layers", 8) * (layer + 2))
    projector = v.get("vision_output_dim", 7680) * text_hidden + text_hidden
    head_dim = t.get("head_dim") or text_hidden // t["num_attention_heads"]
    cross = len(t.get("cross_attention_layers") or []) * (2 * head_dim + 2)
    return vision + projector + 8 * text_hidden + cross


def extra_params(cfg: dict[str, Any], text_hidden: int) -> int:
    """Parameters outside the text decoder's standard layers, embeddings and head (0 for text models)."""
    kind = cfg.get("model_type")
    if kind not in MULTIMODAL or "vision_config" not in cfg:
        return 0
    return {"llava": _llava, "qwen2_vl": _qwen2_vl, "mllama": _mllama}[kind](cfg, text_hidden)
