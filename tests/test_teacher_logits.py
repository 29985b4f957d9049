"""The teacher's logits made a chunk at a time: the same numbers as the Hugging Face forward, the
same loss and gradients as with the whole [B, T, V] tensor, and never more than a chunk's rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, make

import recursify as rf
from recursify.train.losses import LossConfig, TeacherLogits, distillation_loss, teacher_head

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_and_head_give_the_hf_logits(family):
    """Gemma 2's final soft-cap included: the split must be exact, or KD distils another target."""
    teacher = make(family).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    decoder, head = teacher_head(teacher)
    with torch.no_grad():
        expected = teacher(input_ids=ids).logits
        got = head(decoder(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_chunked_teacher_logits_give_the_same_loss_and_gradients():
    teacher = make("gemma2").eval()  # soft-capped head
    student_src = make("gemma2")
    torch.manual_seed(1)
    ids = torch.randint(0, teacher.config.vocab_size, (3, 16))
    decoder, head = teacher_head(teacher)
    calls = []

    def counting_head(h):
        calls.append(h.shape[:-1].numel())
        return head(h)

    with torch.no_grad():
        whole = teacher(input_ids=ids).logits
        lazy = TeacherLogits(decoder(input_ids=ids).last_hidden_state, counting_head, teacher.config.vocab_size)
    # 3 sequences x 4 positions per chunk: the loss works over 4 chunks of the 16 positions
    cfg = LossConfig(chunk_elements=3 * 4 * teacher.config.vocab_size)
    results = []
    for target in (whole, lazy):
        student = rf.convert(student_src, rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
        out = distillation_loss(student, ids, target, cfg)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a)
    # Hand-made reference of the objective: forward KL summed over positions / positions.
    log_t = F.log_softmax(whole.float(), -1)
    with torch.no_grad():
        student = rf.convert(student_src, rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
        log_s = F.log_softmax(student(ids).logits.float(), -1)
    expected = (log_t.exp() * (log_t - log_s)).sum() / ids.numel()
    torch.testing.assert_close(loss_b, expected, rtol=1e-5, atol=1e-6)
    # Every head call covered one chunk (12 rows), in the forward and again in the backward.
    assert calls and max(calls) == 12 and len(calls) == 2 * 4
