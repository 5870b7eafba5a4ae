import os


# Offline before anything imports huggingface_hub; CPU DeepSpeed without its accelerator-detection warning.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import time

import pytest


# The fast tier (`make test-fast`): the pure and unit tests. It runs with an empty $LLMREG_CACHE and fails a test that
# builds a lab model (which takes minutes) instead of letting the build slip into the inner loop unnoticed.
FAST_TIER = os.environ.get("LLMREG_TEST_TIER") == "fast"
# Fixtures that load a model the lab builds; a test that requests one (directly or through another fixture) is marked
# `lab` and left out of the fast tier.
LAB_FIXTURES = {"lab_model_dir", "real_model_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if LAB_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.lab)


def pytest_sessionstart(session):
    if not FAST_TIER:
        return
    import llmreg.lab.model

    def refuse_build(path, build, description):
        if llmreg.lab.model.is_lab_model(path):
            return path
        raise RuntimeError(f"a fast-tier test builds {description}: request the lab_model_dir fixture (which marks "
                           "the test `lab`) or mark the test `slow`")

    llmreg.lab.model.build_once = refuse_build


@pytest.fixture(scope="session")
def lab_model_dir(request):
    """The cached lab model, built once per test run if the cache lacks it (about two minutes on two cores; said on
    the terminal, so that the first lab test's time is not a mystery)."""
    from llmreg.lab import LAB_MODEL_ID, ensure_lab_model
    from llmreg.lab.model import is_lab_model, lab_model_dir

    if is_lab_model(lab_model_dir()):
        return lab_model_dir()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    terminal = request.config.pluginmanager.getplugin("terminalreporter")
    with capture.global_and_fixture_disabled():
        terminal.write_line(f"\nbuilding the lab model {LAB_MODEL_ID} into {lab_model_dir()} (once, about two "
                            "minutes) ...", flush=True)
    started = time.time()
    path = ensure_lab_model(show_progress=False)
    with capture.global_and_fixture_disabled():
        terminal.write_line(f"built the lab model in {time.time() - started:.0f} s", flush=True)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small CPU trainings (``pytestmark = pytest.mark.usefixtures(...)``): the lab
    model is tiny, so two OpenMP threads gain nothing and slow every op many-fold when the cores are busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
