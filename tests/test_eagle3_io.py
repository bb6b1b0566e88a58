"""EAGLE3 Hugging Face layout: round trip, the names and shapes SGLang's loader expects, bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aurora_rl.models.eagle3_io import load_eagle3, save_eagle3
from tests.test_speculative import make_draft
from tests.conftest import tiny_target

# What SGLang's LlamaForCausalLMEagle3 maps (q/k/v and gate/up are stacked by its loader).
SGLANG_NAMES = {
    "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "embed_tokens.weight",
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
}


@pytest.mark.unit
def test_round_trip_preserves_outputs(tmp_path):
    model, _ = tiny_target()
    draft = make_draft(model, vocab=48, seed=3)
    save_eagle3(draft, tmp_path / "draft", extra={"policy_version": 7})
    loaded = load_eagle3(tmp_path / "draft")
    for (n, a), (m, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert n == m
        torch.testing.assert_close(a, b)
    ids, h = torch.randint(0, 128, (2, 5)), torch.randn(2, 5, 192)
    pos = torch.arange(5).expand(2, 5)
    a = draft(ids, draft.fuse(h), pos, draft.new_cache(2, 16), torch.tensor([0, 1]))
    b = loaded(ids, loaded.fuse(h), pos, loaded.new_cache(2, 16), torch.tensor([0, 1]))
    torch.testing.assert_close(a.logits, b.logits)
    cfg = json.loads((tmp_path / "draft/config.json").read_text())
    assert cfg["aurora_rl"]["policy_version"] == 7


@pytest.mark.unit
def test_layout_matches_what_sglang_loads(tmp_path):
    model, _ = tiny_target()
    draft = make_draft(model, vocab=48)
    save_eagle3(draft, tmp_path / "d")
    cfg = json.loads((tmp_path / "d/config.json").read_text())
    tensors = load_file(str(tmp_path / "d/model.safetensors"))
    assert set(tensors) == SGLANG_NAMES
    H, nh, nkv, hd = 64, 4, 2, 16
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 48 and cfg["vocab_size"] == 128 and cfg["tie_word_embeddings"] is False
    assert tensors["fc.weight"].shape == (H, 3 * H)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (nh * hd, 2 * H)
    assert tensors["midlayer.self_attn.k_proj.weight"].shape == (nkv * hd, 2 * H)
    assert tensors["lm_head.weight"].shape == (48, H)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    # SGLang's hot-token map: draft id + d2t = target id; t2d marks exactly those target ids.
    hot = tensors["d2t"] + torch.arange(48)
    assert tensors["t2d"].nonzero().flatten().tolist() == hot.tolist()


@pytest.mark.unit
def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_eagle3(tmp_path)
    model, _ = tiny_target()
    save_eagle3(make_draft(model, vocab=48), tmp_path / "d")
    tensors = load_file(str(tmp_path / "d/model.safetensors"))
    del tensors["midlayer.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "d/model.safetensors"))
    with pytest.raises(ValueError, match="midlayer.mlp.up_proj.weight"):
        load_eagle3(tmp_path / "d")
    cfg = json.loads((tmp_path / "d/config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "d/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLMEagle3"):
        load_eagle3(tmp_path / "d")
