"""Fuse two next-token distributions the way logitfuse does at every decoding step.

Runs in seconds on a CPU with random logits standing in for the two models:
    python examples/quickstart.py
"""

import torch

import logitfuse
from logitfuse import FusionHead, TopK, VocabMap

torch.manual_seed(0)
batch, v_slm, v_llm = 2, 1000, 1200
slm_logits = torch.randn(batch, v_slm) * 3           # on-device model: saw the private context
llm_logits = torch.randn(batch, v_llm) * 3           # cloud model: saw the public instruction only
vocab_map = VocabMap.identity(v_slm, v_llm)          # same tokenizer; see VocabMap.from_tokenizers

# 1. dense LLM logits, a fixed weight: linear mixture of the two distributions
fused = logitfuse.fuse(slm_logits, llm_logits, alpha=0.25, vocab_map=vocab_map)
print("fused log-probs", tuple(fused.shape), "rows sum to", fused.exp().sum(-1).tolist())

# 2. what a cloud API returns: its top 20 tokens; the SLM decides where the leftover mass goes
top = torch.log_softmax(llm_logits, -1).topk(20)
topk = TopK(top.indices, top.values)
fused_topk = logitfuse.fuse(slm_logits, topk, alpha=0.25, vocab_map=vocab_map, tail="slm")
print("dense vs top-20 agree on the argmax:", torch.equal(fused.argmax(-1), fused_topk.argmax(-1)))

# 3. a fusion head picks α per row from both distributions (train one with `logitfuse train`)
head = FusionHead(v_slm, v_llm, vocab_map_hash=vocab_map.hash)
alpha = head(slm_logits, topk, vocab_map)
ids = logitfuse.fuse_sample(slm_logits, topk, alpha=alpha, vocab_map=vocab_map, top_p=0.9,
                            generator=torch.Generator().manual_seed(0))
print("alpha per row", [round(a, 3) for a in alpha.tolist()], "sampled ids", ids.tolist())
