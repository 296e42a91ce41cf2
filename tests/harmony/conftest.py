import pytest

from cluster.harmony import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()
