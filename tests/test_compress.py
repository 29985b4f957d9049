"""`recursify compress` end to end on a tiny model: the recipe, its summary, bad input, resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from test_train import word_tokenizer, write_corpus
from tiny_models import make

import recursify as rf
from recursify.compress import CompressConfig, CompressError, compress, parse_duration
from recursify.compress.state import RunState


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    make("llama").save_pretrained(root / "teacher")
    word_tokenizer().save_pretrained(root / "teacher")
    write_corpus(root / "data.jsonl", docs=400)
    return root


def cfg(root, out, **kw) -> CompressConfig:
    base = dict(model=str(root / "teacher"), out=str(out), data=[str(root / "data.jsonl")], loops=2, lora_rank=4,
                time_budget=60.0, calib_tokens=256, seq_len=16, batch_size=8, lr=1e-2, eval_tokens=256,
                curvature=False)  # on by default; its own test below turns it on (it lengthens every preparation)
    base.update(kw)
    return CompressConfig(**base)


def test_compress_writes_a_checkpoint_and_a_summary_from_its_numbers(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "small"
    summary = compress(cfg(teacher_dir, out, time_budget=60.0, max_tokens=8 * 16 * 40), log=lambda s: None)
    assert summary["seconds"] < 60.0 and summary["train_tokens"] <= 8 * 16 * 40
    assert summary["train_steps"] >= 1 and summary["ppl"]["student"] < summary["ppl"]["converted"]
    assert json.loads((out / "summary.json").read_text())["ppl"] == summary["ppl"]
    md = (out / "summary.md").read_text()
    assert f"{summary['ppl']['student']:.2f}" in md and f"{summary['top1_agreement']:.3f}" in md
    model, _ = rf.load_pretrained(str(out))
    assert isinstance(model, rf.RecursiveForCausalLM)
    assert model.recursion.calibration["tokens"] == 256 and model.recursion.lora_rank == 4
    assert not (tmp_path / ".small.work").exists()
    assert list((tmp_path / "cache" / "calibration").glob("*.safetensors"))  # statistics kept for the next run
    with pytest.raises(CompressError, match="already exists"):
        compress(cfg(teacher_dir, out), log=lambda s: None)


def test_budget_too_short_for_one_step_leaves_nothing(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "never"
    with pytest.raises(CompressError, match="raise --time-budget"):
        compress(cfg(teacher_dir, out, time_budget=0.5), log=lambda s: None)
    assert not out.exists() and not (tmp_path / ".never.work").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(time_budget=0), "time-budget"),
    (dict(eval_tokens=8), "eval-tokens"),
    (dict(loops=4), "does not divide"),
    (dict(lora_rank="auto"), "goes with"),
    (dict(target_params=0.7), "goes with"),
    (dict(loops="auto", target_params=0.7), "needs a number of loops"),
    (dict(loops="auto", lora_rank=None, target_params=0.05), "below the smallest recursive model"),
    (dict(loops="three"), "number of loops or auto"),
    (dict(lora_rank="auto", target_params=1.5), r"in \(0, 1\]"),
    (dict(lora_rank="auto", target_params=0.05), "even rank 0"),
    (dict(local_fraction=1.0), "local-fraction"),
    (dict(paper_tasks=-1), "paper-tasks"),
    (dict(exit_schedule="sometimes"), "exit-schedule"),
    (dict(trainable="lora"), "trainable"),
    (dict(hidden_weight=-1.0), "hidden-weight"),
])
def test_bad_requests_are_one_line_errors(teacher_dir, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        compress(cfg(teacher_dir, tmp_path / "bad", **kw), log=lambda s: None)
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.work").exists()


@pytest.mark.parametrize("field", ["data", "heldout"])
def test_a_missing_data_source_fails_before_the_model_loads(teacher_dir, tmp_path, monkeypatch, field):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the data sources were checked")

    monkeypatch.setattr(rf.hub, "load_pretrained", no_loading)
    with pytest.raises(CompressError, match="data source not found: .*nope"):
        compress(cfg(teacher_dir, tmp_path / "bad", **{field: [str(teacher_dir / "data.jsonl"), str(tmp_path / "nope")]}),
                 log=lambda s: None)
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.work").exists()


def test_local_stage_allocated_ranks_and_calibrated_shared_weights(teacher_dir, tmp_path, monkeypatch):
    """The full recipe with every option: the ranks fit the budget, and the local stage runs,
    changes the model and is reported."""
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "full"
    summary = compress(cfg(teacher_dir, out, time_budget=90.0, max_tokens=8 * 16 * 20, init="calibrated",
                           lora_rank="auto", target_params=0.9, local_fraction=0.3, local_tokens=512),
                       log=lambda s: None)
    assert summary["params"]["fraction"] <= 0.9
    assert summary["recursion"]["rank_pattern"] and summary["recursion"]["init"] == "calibrated"
    assert summary["local_tokens"] > 0 and summary["ppl"]["after_local"] is not None
    assert summary["ppl"]["after_local"] != summary["ppl"]["converted"]
    assert "after local distillation" in (out / "summary.md").read_text()


def test_loops_auto_keeps_the_best_converted_layout_and_reports_the_search(teacher_dir, tmp_path, monkeypatch):
    import recursify.conversion.calibrate
    import recursify.conversion.layout_search

    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    seen = {}
    real_stats, real_search = recursify.conversion.calibrate.cached_stats, recursify.conversion.layout_search.search

    def stats_spy(source, seqs, *a, **kw):
        seen["calibration"] = seqs
        return real_stats(source, seqs, *a, **kw)

    def search_spy(source, stats, probe, *a, **kw):
        seen["probe"] = probe
        return real_search(source, stats, probe, *a, **kw)

    monkeypatch.setattr(recursify.conversion.calibrate, "cached_stats", stats_spy)
    monkeypatch.setattr(recursify.conversion.layout_search, "search", search_spy)
    out = tmp_path / "auto"
    s = compress(cfg(teacher_dir, out, loops="auto", lora_rank=None, target_params=0.8, max_tokens=8 * 16 * 4,
                     time_budget=300.0),
                 log=lambda line: None)
    # the layouts are scored on text the statistics never saw (else high ranks win by overfitting it)
    stream = recursify.conversion.calibrate.calibration_sequences([str(teacher_dir / "data.jsonl")], word_tokenizer(),
                                                       256 + 2048, 16)  # the training text in order
    assert torch.equal(seen["calibration"], stream[:16]) and torch.equal(seen["probe"], stream[16:])
    found = s["layout_search"]
    assert [c["loops"] for c in found] == [2, 3, 6] and all(c["params"] <= 0.8 * s["params"]["teacher"] for c in found)
    best = min(found, key=lambda c: c["ppl"])
    assert s["recursion"]["num_loops"] == best["loops"] and str(s["recursion"]["lora_rank"]) == best["rank"]
    assert s["params"]["student"] == best["params"]
    assert s["recursion"]["init"] == "calibrated"  # the default: scored with average init, converted with this
    md = (out / "summary.md").read_text()
    assert "Loops and rank chosen among 3 layouts that fit 80% of the teacher" in md
    assert f"{best['loops']} loops, rank {best['rank']}: {best['ppl']:.4g}" in md


def test_a_short_budget_gives_up_the_layout_search_before_calibration_text(teacher_dir, tmp_path, monkeypatch):
    """The layout taken without a search ended within 1 % of the best after training, while fewer
    calibration tokens cost the conversion far more (README): a short budget drops the search first."""
    import recursify.compress.plan as plan_module
    import recursify.conversion.calibrate
    from recursify.conversion.layout_search import candidates, without_search

    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    seen = {}
    real_stats, real_cost = recursify.conversion.calibrate.cached_stats, plan_module.convert_forwards

    def stats_spy(source, seqs, *a, **kw):
        seen["calibration"] = seqs
        return real_stats(source, seqs, *a, **kw)

    monkeypatch.setattr(recursify.conversion.calibrate, "cached_stats", stats_spy)
    # scoring the layouts (average init) would take days; the chosen layout's own conversion does not
    monkeypatch.setattr(plan_module, "convert_forwards", lambda init, scale=1.0: 10**12 if init == "average" else real_cost(init, scale))
    lines = []
    s = compress(cfg(teacher_dir, tmp_path / "short", loops="auto", lora_rank=None, target_params=0.8,
                     calib_tokens=4096, max_tokens=8 * 16 * 4, time_budget=300.0), log=lines.append)
    assert seen["calibration"].numel() == 4096  # not cut to 2048 to make room for the search
    assert not any("instead of 4096" in line for line in lines) and s["layout_search"] is None
    teacher, _ = rf.load_pretrained(str(teacher_dir / "teacher"))
    pick = without_search(teacher, candidates(teacher, 0.8, "cycle", "average"))
    assert any(f"too short to compare 3 layouts; using {pick.loops} loops" in line for line in lines)
    assert (s["recursion"]["num_loops"], s["recursion"]["init"]) == (pick.loops, "calibrated")


def test_baseline_and_paper_tasks_are_measured_beside_the_compressed_model(teacher_dir, tmp_path, monkeypatch):
    """--baseline distils the largest plain layer subset that fits the student's size for the
    student's own training time; --paper-tasks scores every model on the same items."""
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    import recursify.train.trainer as trainer_module

    runs = []  # (run folder, TrainConfig) of each distillation

    def spy(tc, **kw):
        runs.append((Path(tc.out).name, tc))
        return train(tc, **kw)

    train = trainer_module.train
    monkeypatch.setattr(trainer_module, "train", spy)
    out = tmp_path / "with-baseline"
    s = compress(cfg(teacher_dir, out, time_budget=60.0, max_tokens=8 * 16 * 10, baseline=True, paper_tasks=2,
                     exit_schedule="aggressive", hidden_weight=0.5, trainable="body", baseline_lr=2e-3),
                 log=lambda line: None)  # exit losses and hidden-state targets for the student only: the baseline has no loops
    teacher, _ = rf.load_pretrained(str(teacher_dir / "teacher"))
    per_layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    rest = s["params"]["teacher"] - 6 * per_layer
    base = s["baseline"]
    assert base["layers"] == (s["params"]["student"] - rest) // per_layer  # the most whole layers that fit
    assert base["params"] == rest + base["layers"] * per_layer <= s["params"]["student"]
    assert 0 < base["train_tokens"] and base["ppl"] > 0 and 0 <= base["top1_agreement"] <= 1
    assert set(s["paper"]) == {"teacher", "student", "baseline"}
    assert all(len(r["tasks"]) == 7 for r in s["paper"].values())
    md = (out / "summary.md").read_text()
    assert f"| plain {base['layers']}-layer model, same training time" in md and f"{base['ppl']:.2f}" in md
    # each model at its own peak rate, both warmed up over at least 5 steps
    assert [(name, tc.lr) for name, tc in runs] == [("kd", 1e-2), ("baseline", 2e-3)] and base["lr"] == 2e-3
    assert all(tc.warmup_steps >= 5 for _, tc in runs) and f"tokens, lr 0.002) |" in md
    kept, _ = rf.load_pretrained(str(out / "baseline"))  # the plain model is kept beside the compressed one
    assert kept.config.num_hidden_layers == base["layers"] and sum(p.numel() for p in kept.parameters()) == base["params"]
    gap = 100 * (s["paper"]["teacher"]["average"] - s["paper"]["student"]["average"])
    assert f"average is {gap:.1f} points below the teacher's" in md
    assert ("Distillation: KD on the logits + hidden-state distillation at weight 0.5 + aggressive early-exit losses, "
            "lr 0.01, training everything but the embedding and head.") in md


def test_by_default_the_loops_and_rank_are_chosen_for_three_quarters_of_the_teacher():
    c = CompressConfig()
    c.validate()
    assert (c.loops, c.lora_rank, c.target_params) == ("auto", None, 0.75)


def test_parse_duration():
    assert [parse_duration(t) for t in ("90", "90s", "1.5m", "2h")] == [90, 90, 90, 7200]
    with pytest.raises(ValueError, match="cannot read the duration"):
        parse_duration("soon")


def test_an_interrupted_run_resumes_where_it_stopped(teacher_dir, tmp_path, monkeypatch):
    """SIGINT during distillation keeps the work folder; the same call again resumes from the
    trainer's checkpoint instead of starting over, and finishes."""
    import recursify.train.trainer as trainer_mod

    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    real_train = trainer_mod.train

    def interrupted(config, on_step=None, **kw):
        return real_train(config, on_step=lambda rec: rec["step"] == 3 and signal.raise_signal(signal.SIGINT), **kw)

    monkeypatch.setattr(trainer_mod, "train", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # asked for the paper's tasks, which the resumed run drops
        compress(cfg(teacher_dir, out, time_budget=120.0, max_tokens=8 * 16 * 12, paper_tasks=5), log=lambda s: None)
    work = tmp_path / ".resumed.work"
    assert (work / "state.json").exists() and not out.exists()
    assert [p.name for p in (work / "kd" / "checkpoints").iterdir()] == ["step-0000003"]
    state = RunState.load(work / "state.json")  # what the resumed run starts from
    assert state.max_tokens == 8 * 16 * 12 and state.teacher_ppl > 0 and state.train_steps is None

    with pytest.raises(CompressError, match="other settings"):  # a training setting may not change
        compress(cfg(teacher_dir, out, time_budget=120.0, max_tokens=8 * 16 * 12, lr=5e-3), log=lambda s: None)
    assert (work / "state.json").exists()
    monkeypatch.setattr(trainer_mod, "train", real_train)
    lines = []
    summary = compress(cfg(teacher_dir, out, time_budget=120.0, max_tokens=8 * 16 * 12), log=lines.append)
    assert any("resuming" in line for line in lines)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps[:3] == [1, 2, 3] and steps == sorted(set(steps)) and summary["train_steps"] == steps[-1] > 3


def test_an_unreadable_state_file_is_one_line_and_keeps_the_work_folder(teacher_dir, tmp_path):
    work = tmp_path / ".garbled.work"
    work.mkdir()
    (work / "state.json").write_text('{"step": 3}')
    with pytest.raises(CompressError, match="is not a recursify compress state .*pass --overwrite"):
        compress(cfg(teacher_dir, tmp_path / "garbled"), log=lambda s: None)
    assert (work / "state.json").exists()


def test_curvature_is_recorded_and_a_short_budget_drops_it_before_calibration_text(teacher_dir, tmp_path, monkeypatch):
    import recursify.compress.plan as plan_module

    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    lines = []
    s = compress(cfg(teacher_dir, tmp_path / "both", curvature=True, max_tokens=8 * 16 * 2), log=lines.append)
    assert s["recursion"]["calibration"]["curvature_tokens"] == 256
    assert "with the output curvature" in (tmp_path / "both" / "summary.md").read_text()
    assert list((tmp_path / "cache" / "calibration").glob("*.curvature.safetensors"))

    # a curvature that would take days: dropped, while the calibration text stays whole
    monkeypatch.setattr(plan_module, "curvature_forwards", lambda tokens, sequential: 10**12)
    lines = []
    s = compress(cfg(teacher_dir, tmp_path / "inputs", curvature=True, calib_tokens=1024, max_tokens=8 * 16 * 2),
                 log=lines.append)
    assert any("too short for the output curvature" in line for line in lines)
    assert "curvature_tokens" not in s["recursion"]["calibration"] and s["recursion"]["calibration"]["tokens"] == 1024


def test_with_the_curvature_the_chosen_layout_gets_per_linear_ranks_of_its_size(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    runs = {}
    for allocate in (True, False):
        out = tmp_path / f"allocate-{allocate}"
        runs[allocate] = compress(cfg(teacher_dir, out, loops="auto", lora_rank=None, target_params=0.8, curvature=True,
                                      allocate=allocate, max_tokens=8 * 16 * 2, time_budget=300.0),
                                  log=lambda line: None)
    uniform, allocated = runs[False], runs[True]
    assert uniform["recursion"]["rank_pattern"] is None  # --uniform-ranks: the search's own layout
    chosen = uniform["recursion"]["num_loops"]
    assert allocated["recursion"]["num_loops"] == chosen
    ranks = allocated["recursion"]["rank_pattern"]
    assert set(ranks) == {"q", "k", "v", "o", "gate", "up", "down"} and len(set(ranks.values())) > 1
    # the same size as the uniform layout, short of it by less than one more component of any linear
    spare = uniform["params"]["student"] - allocated["params"]["student"]
    assert 0 <= spare < 6 * (64 + 96)  # tiny llama: 6 positions, no linear's in + out above 64 + 96


@pytest.mark.parametrize("reuse", [False, True])
def test_reuse_freed_memory_reaches_the_trainer(teacher_dir, tmp_path, monkeypatch, reuse):
    """compress distils returning freed buffers to the kernel unless asked to keep them."""
    import recursify.train.trainer as trainer

    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    seen = []

    class Stop(Exception):
        pass

    def fake_train(train_cfg, **kw):
        seen.append(train_cfg.reuse_freed_memory)
        raise Stop

    monkeypatch.setattr(trainer, "train", fake_train)
    with pytest.raises(Stop):
        compress(cfg(teacher_dir, tmp_path / "out", reuse_freed_memory=reuse, sequential=False), log=lambda s: None)
    assert seen == [reuse]
