"""Model name resolution and the hub-unreachable message (no download)."""

from __future__ import annotations

import os
import subprocess
import sys

from rblora.assets import resolve_model


def test_local_folder_and_hub_id_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_unreachable_hub_id_suggests_local_folder_or_embedded_name():
    code = (
        "from rblora.assets import AssetError, load_causal_lm\n"
        "try:\n    load_causal_lm('no-such-org/no-such-model')\n"
        "except AssetError as exc:\n    print(exc)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "no-such-org/no-such-model" in out.stdout
    assert "local folder" in out.stdout and "smollm2-135m-instruct" in out.stdout
