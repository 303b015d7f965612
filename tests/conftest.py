from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    """An empty cache root for this test only."""
    from alignment_artifacts import cache

    root = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV_VAR, str(root))
    cache.set_cache_root(None)
    return root


@pytest.fixture(autouse=True)
def _no_writes_to_the_user_cache(request, tmp_path_factory, monkeypatch):
    """Fast tests get a private cache root, so none can leave entries in ~/.cache (slow tests share it:
    they reuse the converted builtin models)."""
    if request.node.get_closest_marker("slow") is None:
        from alignment_artifacts import cache

        monkeypatch.setenv(cache.ENV_VAR, str(tmp_path_factory.mktemp("cache")))
        cache.set_cache_root(None)
