import os


# Offline before anything imports huggingface_hub; CPU DeepSpeed without its accelerator-detection warning.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest


@pytest.fixture(scope="session")
def lab_model_dir():
    """The cached lab model (built on first use, about two minutes on two cores, then reused across runs)."""
    from llmreg.lab import ensure_lab_model

    return ensure_lab_model(show_progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small CPU trainings (``pytestmark = pytest.mark.usefixtures(...)``): the lab
    model is tiny, so two OpenMP threads gain nothing and slow every op many-fold when the cores are busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
