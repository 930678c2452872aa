import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

ARCHS = ["gpt2", "llama"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def real_model():
    """The embedded default model (SmolLM2-135M-Instruct); skips when its package is not installed."""
    from rlprefix.models.loading import DEFAULT_MODEL, load_model

    try:
        return load_model(DEFAULT_MODEL)
    except FileNotFoundError as e:
        pytest.skip(str(e))
