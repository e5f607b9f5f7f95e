"""Test session set-up: the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any Triton kernel is defined; the kernels
are imported lazily by rlhf_engine, so setting it here is early enough.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A freshly seeded torch.Generator (seed printed; replay with RLHF_ENGINE_TEST_SEED)."""
    from tests.helpers import fresh_generator

    return fresh_generator()
