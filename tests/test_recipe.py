"""`conversion.recipe.calibrated_convert`, checked against references built another way: the plain
calls it sequences (`rf.convert(calibration=)`, `sequential_calibrate`, `with_curvature`,
`allocate_ranks`) made by hand, and the Hugging Face model's own logits at full rank."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make

import recursify as rf
from recursify import conversion
from recursify.conversion.allocate import allocate_ranks, parameter_count
from recursify.conversion.calibrate import collect_stats
from recursify.conversion.curvature import with_curvature
from recursify.conversion.recipe import calibrated_convert
from recursify.conversion.sequential import sequential_calibrate

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def llama():
    source = make("llama").eval()
    ids = torch.randint(0, 97, (8, 16), generator=GEN)
    return source, ids, collect_stats(source, ids, progress=False)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_no_options_is_convert_with_the_statistics(llama):
    source, _, stats = llama
    cfg = rf.RecursionConfig(num_loops=2, init="average", lora_rank=4)
    student = calibrated_convert(source, cfg, stats)
    assert_same_weights(student, rf.convert(source, cfg, progress=False, calibration=stats))
    assert student.recursion == rf.convert(source, cfg, progress=False, calibration=stats).recursion


def test_sequential_is_convert_then_the_refit(llama):
    source, ids, stats = llama
    cfg = rf.RecursionConfig(num_loops=3, init="stepwise", lora_rank=4)
    student = calibrated_convert(source, cfg, stats, ids[:4], sequential=True, damp=0.05)
    reference = rf.convert(source, cfg, progress=False, calibration=stats, damp=0.05)
    sequential_calibrate(reference, source, ids[:4], damp=0.05, progress=False)
    assert_same_weights(student, reference)
    assert student.recursion.calibration["sequential"] is True


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_full_rank_reproduces_the_hugging_face_logits(family):
    """Full rank, undamped, with the sequential refit: every position is exact, so the student's logits
    are the source model's (computed by transformers, not by recursify)."""
    source = make(family).eval()
    ids = torch.randint(0, 97, (32, 16), generator=GEN)  # well over the widest input (96): C invertible
    stats = collect_stats(source, ids, progress=False)
    cfg = rf.RecursionConfig(num_loops=2, init="average", lora_rank="full")
    for sequential in (False, True):
        student = calibrated_convert(source, cfg, stats, ids, sequential=sequential, damp=0.0)
        with torch.no_grad():
            gap = (student(ids).logits - source(ids).logits).abs().max().item()
        assert gap < 1e-3, (sequential, gap)


def test_allocated_ranks_are_allocate_ranks_and_the_hooks_see_them(llama):
    source, _, stats = llama
    cfg = rf.RecursionConfig(num_loops=2, init="average", lora_rank=4)
    lines, announced = [], []
    student = calibrated_convert(source, cfg, stats, allocate_to=0.8, log=lines.append, announce=announced.append)
    ranks = allocate_ranks(source, cfg, stats, 0.8)
    assert student.recursion.rank_pattern == ranks and student.recursion.lora_rank == 0
    reference = rf.convert(source, rf.RecursionConfig(num_loops=2, init="average", rank_pattern=ranks),
                           progress=False, calibration=stats)
    assert_same_weights(student, reference)
    assert [r.rank_pattern for r in announced] == [ranks]
    assert lines == [f"ranks for 80.0% of the teacher's parameters, per linear: {announced[0].rank_text}"]


def test_allocated_to_the_same_size_holds_the_uniform_rank_parameter_count(llama):
    source, _, stats = llama
    cfg = rf.RecursionConfig(num_loops=2, init="average", lora_rank=4)
    student = calibrated_convert(source, cfg, stats, allocate_to="same")
    target = parameter_count(source, cfg) / sum(p.numel() for p in source.parameters())
    assert student.recursion.rank_pattern == allocate_ranks(source, cfg, stats, target)
    assert student.parameter_breakdown()["total"] <= parameter_count(source, cfg)
    with pytest.raises(ValueError, match="'same'"):
        calibrated_convert(source, cfg, stats, allocate_to="uniform")


def test_curvature_is_attached_before_the_fits(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path))
    source, ids, stats = llama
    cfg = rf.RecursionConfig(num_loops=2, init="average", lora_rank=4)
    lines = []
    student = calibrated_convert(source, cfg, stats, ids[:4], curvature=True, sequential=True, log=lines.append)
    curved = with_curvature(stats, source, ids[:4], cache=False, progress=False)
    reference = rf.convert(source, cfg, progress=False, calibration=curved)
    sequential_calibrate(reference, source, ids[:4], progress=False, curvature=curved.curvature)
    assert_same_weights(student, reference)
    assert student.recursion.calibration["curvature_tokens"] == 64
    assert lines == ["output curvature of the teacher on 64 tokens"]


def test_the_refit_and_the_curvature_need_their_tokens(llama):
    source, _, stats = llama
    cfg = rf.RecursionConfig(num_loops=2, lora_rank=4)
    for kw in ({"sequential": True}, {"curvature": True}):
        with pytest.raises(ValueError, match="fit_seqs"):
            calibrated_convert(source, cfg, stats, **kw)


def test_the_package_exports_what_it_lists():
    assert all(callable(getattr(conversion, name)) for name in conversion.__all__)
    assert conversion.calibrated_convert is calibrated_convert
    assert rf.convert is conversion.convert.convert  # the top-level API is unchanged
