"""Ready-made stages for common models (install with ``pip install 'flowbatch[models]'``).

Importing this package is cheap: torch and transformers load only when a
model's ``setup()`` runs.
"""

from flowbatch.models.sentence import (
    EMBEDDING_DIMENSION,
    MODEL_PACKAGE,
    ModelNotInstalled,
    SentenceEmbedder,
    SentenceTokenizer,
    Tokens,
    Vector,
    default_model_path,
)

__all__ = [
    "EMBEDDING_DIMENSION",
    "MODEL_PACKAGE",
    "ModelNotInstalled",
    "SentenceEmbedder",
    "SentenceTokenizer",
    "Tokens",
    "Vector",
    "default_model_path",
]
