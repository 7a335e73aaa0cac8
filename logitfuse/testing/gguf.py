"""A tiny transformers Llama written as a float32 GGUF file (llama.cpp's format), for tests that run the
same weights in transformers and in llama.cpp (``pip install gguf``; nothing is downloaded).
"""

from __future__ import annotations

import json

import numpy as np

__all__ = ["write_tiny_gguf"]


def _rope_pairs_interleaved(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' Llama rotates dimension i of a head with i + d/2; llama.cpp's ``llama``
    architecture rotates 2i with 2i+1: reorder each head's output rows of q/k accordingly."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_gguf(path, tokenizer, model) -> None:
    """``model`` (a transformers LlamaForCausalLM) and its byte-level BPE ``tokenizer`` as a float32 GGUF."""
    import gguf

    cfg = model.config
    rope_theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    control = {added["id"] for added in spec.get("added_tokens", [])}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    weights = {name: value.detach().float().numpy() for name, value in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    for layer in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{layer}.", f"blk.{layer}."
        writer.add_tensor(ours + "attn_norm.weight", weights[hf + "input_layernorm.weight"])
        writer.add_tensor(ours + "attn_q.weight",
                          _rope_pairs_interleaved(weights[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(ours + "attn_k.weight",
                          _rope_pairs_interleaved(weights[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        writer.add_tensor(ours + "attn_v.weight", weights[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(ours + "attn_output.weight", weights[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(ours + "ffn_norm.weight", weights[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(ours + "ffn_gate.weight", weights[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(ours + "ffn_up.weight", weights[hf + "mlp.up_proj.weight"])
        writer.add_tensor(ours + "ffn_down.weight", weights[hf + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
