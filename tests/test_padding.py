"""A record's input never depends on the other records of its batch, whatever the tokenizer's own
padding side: batches are cut from the left edge, so every tokenizer is made to pad on the right."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import torch

from fed_dp_lora.models import load_tokenizer, model_source
from fed_dp_lora.training import encode


def left_padding_model(make_cfg, tmp_path):
    """The packaged MiniLM, in a folder whose tokenizer asks for left padding."""
    folder = tmp_path / "left-minilm"
    source = model_source(make_cfg())
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
    for weights in ("model.safetensors",):
        (folder / weights).symlink_to(f"{source}/{weights}")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    return make_cfg(f"model.name={folder}")


def test_a_left_padding_tokenizer_is_made_to_pad_on_the_right(make_cfg, tmp_path):
    cfg = left_padding_model(make_cfg, tmp_path)
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.padding_side == "right"
    short, long = "good record", "a much longer applicant text with many more words in it than the other"
    alone = encode(pd.DataFrame({"text": [short], "label": [0]}), tokenizer, cfg)
    together = encode(pd.DataFrame({"text": [long, short], "label": [1, 0]}), tokenizer, cfg)
    assert torch.equal(alone.input_ids[0], together.input_ids[1])
    assert alone.attention_mask[0, 0] == 1 and alone.attention_mask[0, -1] == 0  # tokens first, padding last
