"""The fused head loss (`train.head_loss`): the same loss and gradients as autograd through the whole
[B, T, V] logits of the model's own forward, for tied and untied heads, a soft-capped head, a
temperature, CE mixed in and early exits; the tied table's gradient stays one dense tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from loss_reference import kd_ce_loss
from tiny_models import make

import recursify as rf
from recursify.train.losses import LossConfig, TeacherLogits, distillation_loss, exit_weights, teacher_head

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,alpha,temperature,schedule,cap", [
    ("llama_tied", 1.0, 1.0, "none", None),
    ("llama", 0.3, 2.0, "none", None),
    ("gemma2", 0.7, 1.5, "none", 0.3),  # a final soft-cap that bends the tiny model's logits
    ("gemma3", 1.0, 1.0, "aggressive", None),  # tied, every loop's exit
])
def test_fused_head_loss_matches_autograd_through_the_whole_logits(family, alpha, temperature, schedule, cap):
    teacher = make(family)
    torch.manual_seed(3)
    ids = torch.randint(0, teacher.config.vocab_size, (3, 10))
    with torch.no_grad():
        whole = teacher(input_ids=ids).logits
        decoder, head = teacher_head(teacher)
        lazy = TeacherLogits(decoder(input_ids=ids).last_hidden_state, head, teacher.config.vocab_size)
    student = rf.convert(teacher, rf.RecursionConfig(num_loops=3, lora_rank=4), progress=False)
    student.train()
    if cap:
        student.arch = dataclasses.replace(student.arch, final_softcap=cap)
    # Reference: the model's own forward, every loop's readout and the loss written from its definition.
    out = student(ids, use_cache=False, output_loop_states=True)
    exits = [student.exit_logits(h) for h in out.loop_hidden_states]
    weights = exit_weights(schedule, len(exits))
    want = sum(w * kd_ce_loss(z, whole, ids, alpha, temperature) for w, z in zip(weights, exits) if w)
    want.backward()
    expected = _grads(student)
    student.zero_grad(set_to_none=True)
    # 3 sequences x 3 positions a chunk: 4 chunks of the 10 positions, the last one short
    cfg = LossConfig(alpha=alpha, temperature=temperature, exit_schedule=schedule,
                     chunk_elements=3 * 3 * teacher.config.vocab_size)
    got = distillation_loss(student, ids, lazy, cfg)
    got["loss"].backward()
    torch.testing.assert_close(got["loss"], want.detach(), rtol=1e-5, atol=1e-6)
    grads = _grads(student)
    assert grads.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    if student.lm_head.weight is student.embed_tokens.weight:  # one dense gradient for the tied table
        assert student.embed_tokens.weight.grad.layout == torch.strided
