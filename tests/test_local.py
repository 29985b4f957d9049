"""Local distillation: per-position targets from the teacher's own hidden states."""

from __future__ import annotations

import torch
from tiny_models import make

import recursify as rf
from recursify.train.local import local_distill, local_loss, teacher_states

GEN = torch.Generator().manual_seed(0)


def test_teacher_states_end_where_the_source_model_does():
    """h_L through the final norm and head gives the Hugging Face model's logits."""
    source = make("llama").eval()
    teacher = rf.convert(source, rf.RecursionConfig(num_loops=1), progress=False)
    ids = torch.randint(0, 97, (2, 12), generator=GEN)
    states = teacher_states(teacher, ids)
    assert len(states) == source.config.num_hidden_layers + 1
    with torch.no_grad():
        logits = teacher.lm_head(teacher.final_norm(states[-1]))
        torch.testing.assert_close(logits, source(ids).logits, rtol=1e-4, atol=1e-4)


def test_an_exact_student_has_zero_local_loss_and_a_plain_one_does_not():
    source = make("llama").eval()
    teacher = rf.convert(source, rf.RecursionConfig(num_loops=1), progress=False)
    ids = torch.randint(0, 97, (2, 12), generator=GEN)
    states = teacher_states(teacher, ids)
    exact = rf.convert(source, rf.RecursionConfig(num_loops=2, init="average", lora_rank="full"), progress=False)
    plain = rf.convert(source, rf.RecursionConfig(num_loops=2, init="average", lora_rank=0), progress=False)
    with torch.no_grad():
        assert local_loss(exact, states).item() < 1e-8
        assert local_loss(plain, states).item() > 1e-2


def test_local_distillation_brings_the_whole_model_closer_to_the_teacher():
    """Trained only on per-layer targets, the student's *logits* approach the teacher's on text it
    was not trained on."""
    source = make("llama").eval()
    student = rf.convert(source, rf.RecursionConfig(num_loops=3, init="average", lora_rank=2), progress=False)
    train_ids = torch.randint(0, 97, (16, 16), generator=GEN)
    test_ids = torch.randint(0, 97, (4, 16), generator=GEN)

    def kl():
        with torch.no_grad():
            t = source(test_ids).logits.log_softmax(-1)
            s = student(test_ids).logits.log_softmax(-1)
            return (t.exp() * (t - s)).sum(-1).mean().item()

    before = kl()
    result = local_distill(student, source, train_ids, lr=3e-3, batch_size=4, max_steps=60, progress=False)
    assert result["steps"] == 60 and result["tokens"] == 60 * 4 * 16
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert kl() < 0.7 * before
    assert not student.training
