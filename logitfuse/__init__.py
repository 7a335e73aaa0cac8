"""logitfuse: decoding-time logit fusion between a cloud LLM and a private on-device SLM.

The on-device model (SLM) sees the user's private context; the cloud model (LLM) sees only the
public instruction. At every decoding step their next-token distributions are aligned onto the
SLM's vocabulary and mixed with a weight α (CoGenesis, arXiv 2403.03129); :mod:`logitfuse.rules`
fuses N models by other rules (mixtures, proxy-tuning and context steering, contrastive decoding).

>>> import torch, logitfuse
>>> fused = logitfuse.fuse(torch.randn(1, 8), torch.randn(1, 8), alpha=0.25)
>>> fused.shape
torch.Size([1, 8])
"""

from logitfuse.functional import align, fuse, fuse_sample, fuse_with_head, fused_cross_entropy, row_stats
from logitfuse.heads import FusionHead, PaperFusionHead, load_head
from logitfuse.types import MODES, TAILS, Aligned, RowStats, TopK
from logitfuse.config import FusionConfig, SamplingConfig
from logitfuse import rules
from logitfuse.vocab import VocabMap
from logitfuse.backends import HFLLM, LLMBackend, LLMBackendError, LLMOutput, OpenAICompatibleLLM
from logitfuse.decoding.session import FusionSession, SessionStats
from logitfuse.decoding.processor import CoGenesisLogitsProcessor
from logitfuse.decoding.engine import FusedGeneration, generate
from logitfuse.decoding.sketch import SketchResult, SketchSettings, sketch_generate
from logitfuse.decoding.llama_cpp import LlamaCppSLM, SLMGeneration  # llama-cpp-python is imported only when used

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "TAILS",
    "Aligned",
    "FusionConfig",
    "SamplingConfig",
    "rules",
    "FusionHead",
    "PaperFusionHead",
    "RowStats",
    "TopK",
    "VocabMap",
    "align",
    "fuse",
    "fuse_sample",
    "fuse_with_head",
    "fused_cross_entropy",
    "load_head",
    "row_stats",
    "HFLLM",
    "LLMBackend",
    "LLMBackendError",
    "LLMOutput",
    "OpenAICompatibleLLM",
    "FusionSession",
    "SessionStats",
    "CoGenesisLogitsProcessor",
    "FusedGeneration",
    "generate",
    "SketchResult",
    "SketchSettings",
    "sketch_generate",
    "LlamaCppSLM",
    "SLMGeneration",
]
