"""Test setup: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before anything imports Triton, so this happens at conftest import,
before any test module (or logitfuse.kernels) is collected.
"""

import os
import shutil

if os.environ.get("TRITON_INTERPRET") is None and not (
    shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")
):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from logitfuse.testing import byte_level_tokenizer, tiny_llama  # noqa: E402


# tiny random models shared by the generation, backend, server and privacy tests (no downloads)
@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def slm(tok):
    return tiny_llama(len(tok), seed=0)


@pytest.fixture(scope="module")
def llm_model(tok):
    return tiny_llama(len(tok), seed=1)


@pytest.fixture(scope="module")
def served(llm_model, tok):
    """``(server, url)``: `logitfuse serve`'s server on the tiny LLM, recording what it receives
    (``server.received``); a test module may define its own ``served``."""
    from logitfuse.serve.server import serve_in_thread

    server, url = serve_in_thread(llm_model, tok, model_name="tiny", log_requests=True)
    yield server, url
    server.shutdown()
    server.server_close()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests without CUDA, with the reason in the report."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
