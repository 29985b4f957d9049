"""Sequential calibration: each position's LoRA corrects the error its predecessors left.

The plain calibrated init fits every position on the *teacher's* inputs, but the converted model
feeds position p with its own, already-perturbed residual stream. As GPTQ does for quantisation,
walk the positions in order and fit each linear of position p to the teacher's output on the
teacher's input, W_l X_t, from the student's own input X_s:

    min_{rank r}  ||W_l X_t^T - (W_s + B A) X_s^T||
    D* = (W_l C_ts - W_s C_ss) C_ss^{-1}        (C_ss = X_s^T X_s, C_ts = X_t^T X_s)

and the rank-r optimum is D* projected as in `activation_aware_factors(D*, C_ss, r)`: the same
closed form, with the weight difference replaced by the least-squares correction.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from torch import nn

from ..config import RecursionConfig
from ..families import detect_family
from ..modeling import RecursiveForCausalLM
from .calibrate import CalibrationError, activation_aware_factors, linear_input_groups
from .convert import build_config


def layer_fn(model, h: torch.Tensor):
    """f(slot, position, x) -> x after that decoder layer, full causal attention, no cache."""
    bsz, seq, _ = h.shape
    position_ids = torch.arange(seq, device=h.device).unsqueeze(0).expand(bsz, -1)
    rope = model.rope(h, position_ids)
    masks = model.build_masks(None, bsz, seq, 0, h.device)

    def attend(q, k, v, position, is_sliding):
        return model.attention_scores(q, k, v, masks[is_sliding])

    return lambda slot, position, x: model.layer_forward(slot, position, x, rope, attend)


@torch.no_grad()
def one_loop_view(source) -> RecursiveForCausalLM:
    """`source` as a one-loop recursive model (the same function, through recursify's code path)
    whose linears and embeddings are the source's own float32 tensors: no copy of the weights
    (4.4 GiB on a 1B model); only the norms and biases are stacked anew. Weights in another dtype
    are cast, so copied."""
    family = detect_family(source.config)
    with torch.device("meta"):
        view = RecursiveForCausalLM(build_config(source, RecursionConfig(num_loops=1, init="stepwise")))

    def share(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.float(), requires_grad=False)  # .float() of a float32 tensor is itself

    layers = list(source.get_submodule(family.layers))
    for p, layer in enumerate(layers):
        for name, path in family.linears.items():
            view.slots[p].linears[name].weight = share(layer.get_submodule(path).weight)
    for short in view.norm_names:
        view.norm_weight[short] = share(torch.stack([l.get_submodule(family.norms[short]).weight for l in layers]))
        if short in view.norm_bias:
            view.norm_bias[short] = share(torch.stack([l.get_submodule(family.norms[short]).bias for l in layers]))
    for name in view.bias:
        view.bias[name] = share(torch.stack([l.get_submodule(family.linears[name]).bias for l in layers]))
    final = source.get_submodule(family.final_norm)
    view.final_norm_weight = share(final.weight)
    if view.final_norm_bias is not None:
        view.final_norm_bias = share(final.bias)
    view.embed_tokens.weight = share(source.get_input_embeddings().weight)
    view.lm_head.weight = share(source.get_output_embeddings().weight)
    return view.eval()


class _Recorded(Exception):
    pass


@contextmanager
def _recording(model, names, sink: dict, stop_after: str | None = None):
    """Within the block, the input of every linear in `names` is stored in `sink[name]`; with
    `stop_after`, the forward is cut short (raises _Recorded) once that input is stored."""
    original = model._linear

    def recorded(slot, name, x, position):
        if name in names:
            sink[name] = x.reshape(-1, x.shape[-1]).float()
            if name == stop_after:
                raise _Recorded
        return original(slot, name, x, position)

    model._linear = recorded  # an instance attribute shadows the method for this block only
    try:
        yield
    except _Recorded:
        pass
    finally:
        del model._linear


@torch.no_grad()
def sequential_calibrate(model, source, sequences: torch.Tensor, damp: float = 0.01, batch_size: int = 4,
                         progress: bool = True, curvature: dict[str, torch.Tensor] | None = None) -> None:
    """Refit `model`'s LoRA in place, position by position and, within a position, input group by
    input group in forward order (q/k/v, then o, then gate/up, then down), so that every fit sees
    the inputs the already-refitted linears produce. `curvature` ({linear: [L, out, out]},
    `recursify.conversion.curvature`) weighs each fit's output directions by the teacher's."""
    if model.recursion.variant != "relaxed":
        raise CalibrationError("sequential calibration supports the relaxed variant only")
    if not model.lora:
        return  # rank 0: nothing to fit
    groups = linear_input_groups(source)
    reps = list(dict.fromkeys(groups.values()))  # forward order
    # The teacher through the same code path (one loop is the source model exactly), on its weights.
    device = model.embed_tokens.weight.device
    teacher = one_loop_view(source).to(device)
    batches = [sequences[i : i + batch_size].to(device) for i in range(0, len(sequences), batch_size)]
    h_t = [teacher.embed(b) for b in batches]
    h_s = [model.embed(b) for b in batches]
    layers_t = [layer_fn(teacher, h) for h in h_t]
    layers_s = [layer_fn(model, h) for h in h_s]
    layout = model.layout
    for p in tqdm(range(layout.num_layers), desc="sequential calibration", disable=not progress, leave=False):
        slot = layout.slot_of_position[p]
        x_t = []
        for i in range(len(batches)):
            x_t.append({})
            with _recording(teacher, reps, x_t[i]):
                h_t[i] = layers_t[i](p, p, h_t[i])
        for g in reps:
            names = [n for n in model.lora if groups[n] == g]
            if not names:
                continue
            C = Cts = None
            for i in range(len(batches)):
                xs = {}
                with _recording(model, (g,), xs, stop_after=g):
                    layers_s[i](slot, p, h_s[i])
                ss, ts = (xs[g].T @ xs[g]).double(), (x_t[i][g].T @ xs[g]).double()
                C, Cts = (ss, ts) if C is None else (C.add_(ss), Cts.add_(ts))
            ridge = damp * torch.diagonal(C).mean().clamp(min=1e-12) * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
            for name in names:
                lora = model.lora[name]
                W_t = teacher.slots[p].linears[name].weight.double()
                W_s = model.slots[slot].linears[name].weight.double()
                D = torch.linalg.solve(C + ridge, (W_t @ Cts - W_s @ C).T).T  # (.) (C + ridge)^{-1}, C symmetric
                G = None if curvature is None else curvature[name][p : p + 1].to(D)
                B, A = activation_aware_factors(D.unsqueeze(0), C.unsqueeze(0), lora.rank, damp=damp, out_cov=G)
                lora.lora_B[p].copy_(B[0])
                lora.lora_A[p].copy_(A[0])
        for i in range(len(batches)):
            h_s[i] = layers_s[i](slot, p, h_s[i])
    del teacher
    calibration = {**(model.recursion.calibration or {}), "sequential": True, "sequential_tokens": sequences.numel()}
    model.config.recursion = {**model.config.recursion, "calibration": calibration}
    model.recursion = model.config.recursion_config()
