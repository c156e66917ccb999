"""Text corpora for ICL and geometry: one spec string, three kinds of source.

    path/to/file.jsonl[.gz]       one JSON object per line with a ``text`` field (``id``/``title`` optional)
    path/to/folder/               every ``*.txt`` file is a document (sorted by name)
    hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]   a Hugging Face dataset, e.g. the default
                                  ``hf:wikimedia/wikipedia:20231101.simple:train:text``
                                  (the paper used ``hf:wikipedia:20220301.simple:train:text``)
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from attnlab.core.errors import CorpusError

DEFAULT_CORPUS = "hf:wikimedia/wikipedia:20231101.simple:train:text"


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


def load_corpus(spec: str, limit: int | None = None) -> list[Document]:
    """Documents of ``spec`` (see module docstring), at most ``limit`` of them."""
    if spec.startswith("hf:"):
        docs = _load_hf(spec[3:], limit)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            docs = _load_txt_folder(path, limit)
        elif path.is_file():
            docs = _load_jsonl(path, limit)
        else:
            raise CorpusError(
                f"corpus {spec!r} is neither an existing .jsonl/.jsonl.gz file, a folder of .txt files, nor a "
                "dataset spec 'hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]'"
            )
    if not docs:
        raise CorpusError(f"corpus {spec!r} contains no documents with text")
    return docs


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"  # by content, not by name: a gzip file named .jsonl still reads


def _load_jsonl(path: Path, limit):
    docs = []
    i = -1
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"corpus file {path}: line {i + 1} is not valid JSON ({exc.msg}); each line "
                                      "must be one JSON object with a 'text' field") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise CorpusError(f"{path}: line {i + 1} has no string 'text' field")
                if rec["text"].strip():
                    docs.append(Document(str(rec.get("id", i)), str(rec.get("title", "")), rec["text"]))
                if limit and len(docs) >= limit:
                    break
    except EOFError:
        raise CorpusError(f"corpus file {path} is truncated (the gzip stream ends after line {i + 1}); "
                          "copy or download it again") from None
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc}; pass a UTF-8 .jsonl or .jsonl.gz file") from None
    return docs


def _load_txt_folder(path: Path, limit):
    files = sorted(path.glob("*.txt"))
    if not files:
        raise CorpusError(f"corpus folder {path} has no .txt files")
    docs = []
    for f in files[:limit] if limit else files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CorpusError(f"cannot read {f}: {exc}") from exc
        if text.strip():
            docs.append(Document(f.stem, f.stem, text))
    return docs


def _load_hf(spec: str, limit):
    from attnlab.core.models import hub_reachable

    if not hub_reachable():  # decided once per process; datasets would otherwise retry the network
        err = CorpusError(f"corpus 'hf:{spec}' streams from the Hugging Face Hub, which cannot be reached from this "
                          "machine; pass a local corpus (a .jsonl/.jsonl.gz with a 'text' field, or a folder of .txt "
                          "files)")
        err.unavailable = True
        raise err
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    field = parts[3] if len(parts) > 3 and parts[3] else "text"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        docs = []
        for i, rec in enumerate(ds):
            docs.append(Document(str(rec.get("id", i)), str(rec.get("title", "")), rec[field]))
            if limit and len(docs) >= limit:
                break
        return docs
    except KeyError as exc:
        raise CorpusError(f"dataset {name!r} has no field {field!r}") from exc
    except Exception as exc:  # network, missing config, ... : all mean "cannot use this dataset here"
        raise CorpusError(
            f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. If this machine is offline, pass a local corpus "
            "instead (a .jsonl/.jsonl.gz with a 'text' field, or a folder of .txt files)"
        ) from exc


def offline_default(spec: str) -> str:
    """``spec``, except that the default Hub corpus becomes the shared Simple Wikipedia file beside the checkout
    when the Hub does not answer and that file is there (a fresh offline machine still gets real text)."""
    if spec != DEFAULT_CORPUS:
        return spec
    from attnlab.core.models import hub_reachable

    local = Path(__file__).resolve().parents[2] / "shared" / "data" / "simplewiki" / "articles-400.jsonl.gz"
    if local.is_file() and not hub_reachable():
        return str(local)
    return spec
