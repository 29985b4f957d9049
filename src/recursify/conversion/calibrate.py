"""Activation statistics of the source model, and the closed forms that use them.

A plain conversion fits each position's LoRA to the weight difference Delta_l = W_l - W_shared
in the Frobenius norm, as if every input direction mattered equally. Real inputs do not: a few
directions carry most of the energy. With C_l = X_l^T X_l accumulated over real text, the rank-r
correction that minimises the error the layer's *outputs* see, ||(Delta_l - B A) X_l^T||, has a
closed form (the idea behind SVD-LLM's whitening and EoRA's eigenspace projection): B = the top-r
eigenvectors U_r of Delta_l C_l Delta_l^T, A = U_r^T Delta_l. That is what makes a conversion
nearly right before any training.

Statistics are gathered once per (model, tokens) and cached on disk: per unrolled position and per
distinct linear input (q/k/v read the same tensor, so do gate/up), X^T X accumulated in float32 (the closed forms solve in float64).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..families import Family, detect_family


class CalibrationError(ValueError):
    """Calibration input that cannot give usable statistics; one line meant for the user."""


@dataclass
class CalibrationStats:
    """Per-position input covariances of the source model's linears.

    `cov[group]` is [L, d_in, d_in] float32, the mean of x x^T over `num_tokens` tokens (the
    closed forms that read it work in float64);
    `input_of[linear]` names the group whose input that linear reads.
    """

    num_tokens: int
    input_of: dict[str, str]
    cov: dict[str, torch.Tensor]
    curvature: dict[str, torch.Tensor] | None = None  # {linear: [L, out, out]}, see recursify.conversion.curvature
    curvature_tokens: int = 0

    def of(self, linear: str) -> torch.Tensor:
        return self.cov[self.input_of[linear]]

    def out_of(self, linear: str) -> torch.Tensor | None:
        return None if self.curvature is None else self.curvature[linear]

    def save(self, path: str | Path) -> None:
        meta = {"num_tokens": str(self.num_tokens), "input_of": json.dumps(self.input_of),
                "curvature_tokens": str(self.curvature_tokens if self.curvature else 0)}
        tensors = {**self.cov, **{f"curvature.{k}": v for k, v in (self.curvature or {}).items()}}
        save_tensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        curvature = {k.removeprefix("curvature."): v for k, v in tensors.items() if k.startswith("curvature.")}
        cov = {k: v for k, v in tensors.items() if not k.startswith("curvature.")}
        return cls(int(meta["num_tokens"]), json.loads(meta["input_of"]), cov, curvature or None,
                   int(meta.get("curvature_tokens", 0)))


class _StopForward(Exception):
    pass


def _layers(source, family: Family):
    return list(source.get_submodule(family.layers))


@torch.no_grad()
def linear_input_groups(source, family: Family | None = None) -> dict[str, str]:
    """Which linears of a decoder layer read the very same input tensor (found by running the
    model once on a short input, so no family needs to spell it out)."""
    family = family or detect_family(source.config)
    layer = _layers(source, family)[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.get_submodule(path).register_forward_pre_hook(lambda m, args, n=name: seen.setdefault(n, args[0]))
        for name, path in family.linears.items()
    ]
    try:
        device = source.get_input_embeddings().weight.device
        source(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[str, str] = {}
    for name in family.linears:
        groups[name] = next((g for g in dict.fromkeys(groups.values()) if seen[g] is seen[name]), name)
    return groups


def check_tokens(source, sequences: torch.Tensor) -> None:
    """Calibration tokens that the model can read, or one CalibrationError line."""
    vocab = source.get_input_embeddings().weight.shape[0]
    if sequences.numel() == 0:
        raise CalibrationError("no calibration tokens")
    if int(sequences.max()) >= vocab or int(sequences.min()) < 0:
        raise CalibrationError(
            f"calibration token ids reach {int(sequences.max())} but the model's vocabulary has {vocab} entries: "
            "the text was tokenised with another tokenizer"
        )


@torch.no_grad()
def collect_stats(source, sequences: torch.Tensor, batch_size: int = 4, progress: bool = True) -> CalibrationStats:
    """X^T X / N of every linear's input at every layer of `source`, over `sequences` [n, T].

    Each batch's products are formed in float32 and added in place into one preallocated
    [L, d_in, d_in] float32 stack per input group on the model's device, moved to the CPU once at
    the end: the statistics of a 1B model (22 layers, four groups, the widest 5632 wide) then take
    3.9 GB once, where float64 per-layer tensors stacked at the end took 7.8 GB twice over. The LM
    head is never run: the forward stops at the final norm.
    """
    family = detect_family(source.config)
    groups = linear_input_groups(source, family)
    layers = _layers(source, family)
    device = source.get_input_embeddings().weight.device
    check_tokens(source, sequences)
    acc: dict[str, torch.Tensor] = {}
    for g in dict.fromkeys(groups.values()):
        d_in = layers[0].get_submodule(family.linears[g]).weight.shape[1]
        acc[g] = torch.zeros(len(layers), d_in, d_in, dtype=torch.float32, device=device)

    def record(group: str, index: int):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            acc[group][index].add_(x.T @ x)

        return hook

    def stop(*_):
        raise _StopForward

    hooks = [
        layer.get_submodule(family.linears[g]).register_forward_pre_hook(record(g, i))
        for i, layer in enumerate(layers)
        for g in acc
    ]
    hooks.append(source.get_submodule(family.final_norm).register_forward_hook(stop))
    n_tokens = 0
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc="calibrating", disable=not progress, leave=False):
            batch = sequences[start : start + batch_size].to(device)
            try:
                source(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            n_tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    cov = {g: mats.div_(n_tokens).cpu() for g, mats in acc.items()}
    d_min = min(c.shape[-1] for c in cov.values())
    if n_tokens < d_min:
        warnings.warn(
            f"{n_tokens} calibration tokens are fewer than the {d_min} input features of the narrowest linear: "
            "the covariances are singular and are regularised (damping); pass more text for a better conversion",
            stacklevel=2,
        )
    return CalibrationStats(n_tokens, groups, cov)


def _model_digest(source):
    """The model's part of `fingerprint`: config + embedding + one layer's bytes."""
    family = detect_family(source.config)
    h = hashlib.sha256()
    h.update(json.dumps(source.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(source.get_input_embeddings().weight.detach().float().cpu().numpy().tobytes())
    for p in _layers(source, family)[-1].parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h


def fingerprint(source, sequences: torch.Tensor, _model=None) -> str:
    """A cache key for (model weights, tokens): config + embedding + one layer's bytes + token ids."""
    h = (_model_digest(source) if _model is None else _model).copy()
    h.update(sequences.cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:24]


def stats_path(source, sequences: torch.Tensor, cache_dir: str | Path) -> Path:
    """Where `cached_stats` keeps the statistics of `source` on `sequences`."""
    return Path(cache_dir) / f"{fingerprint(source, sequences)}.safetensors"


def stats_paths(source, token_sets: list[torch.Tensor], cache_dir: str | Path) -> list[Path]:
    """`stats_path` of several token sets of one model, its weights hashed once."""
    model = _model_digest(source)
    return [Path(cache_dir) / f"{fingerprint(source, seqs, model)}.safetensors" for seqs in token_sets]


def cached_stats(source, sequences: torch.Tensor, cache_dir: str | Path | None, progress: bool = True) -> CalibrationStats:
    """`collect_stats`, reusing a previous result for the same model and tokens."""
    if cache_dir is None:
        return collect_stats(source, sequences, progress=progress)
    return load_or_compute(stats_path(source, sequences, cache_dir), CalibrationStats.load,
                           lambda: collect_stats(source, sequences, progress=progress),
                           lambda stats, path: stats.save(path))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written whole or not at all (through a temporary file), so that a kill
    half-way leaves no truncated cache entry behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_or_compute(path: Path, load, compute, save):
    """`load(path)` when a readable cache entry is there, else `compute()` and `save(result, path)`."""
    if path.exists():
        try:
            return load(path)
        except Exception as e:  # a truncated or foreign file: recompute
            warnings.warn(f"ignoring unreadable cache {path}: {e}", stacklevel=3)
    result = compute()
    save(result, path)
    return result


OUT_DAMP = 0.1  # ridge on the output curvature G, as a fraction of its mean diagonal


def psd_root(matrix: torch.Tensor) -> torch.Tensor:
    """M^{1/2} of symmetric positive semi-definite matrices [..., n, n] (negative rounding clipped)."""
    w, Q = torch.linalg.eigh(matrix)
    return (Q * w.clamp(min=0).sqrt().unsqueeze(-2)) @ Q.transpose(-1, -2)


@torch.no_grad()
def activation_aware_factors(
    delta: torch.Tensor, cov: torch.Tensor, rank: int, damp: float = 0.01, out_cov: torch.Tensor | None = None,
    out_damp: float = OUT_DAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (B [n, out, r], A [n, r, in]) minimising ||G^{1/2} (Delta - B A) C^{1/2}||_F per matrix.

    The optimum is B A = U_r U_r^T Delta with U_r the top-r left singular vectors of Delta C^{1/2}:
    from the eigenvectors of Delta C Delta^T when out <= in, else from the smaller in x in Gram
    of Delta C^{1/2}. `damp` adds damp * mean(diag C) to C's diagonal (as GPTQ does), so that
    directions the calibration text never excited fall back to the plain weight fit. Factors
    follow `truncated_svd`'s convention (rows of A of unit norm), so with C = I they are the plain
    SVD factors; at full rank B A = Delta exactly whatever C is.

    `out_cov` G [n, out, out] (default the identity; `recursify.conversion.curvature`) also weighs the output
    directions: the same projection of G^{1/2} Delta, mapped back, B A = G^{-1/2} U_r U_r^T G^{1/2} Delta,
    with G damped by `out_damp` * mean(diag G).
    """
    out_f, in_f = delta.shape[1:]
    D = delta.double()
    root_inv = None
    if out_cov is not None:
        w, Q = torch.linalg.eigh(_damped(out_cov.to(D), out_damp))
        w = w.clamp(min=w.amax(-1, keepdim=True) * 1e-12)
        D = (Q * w.sqrt().unsqueeze(-2)) @ Q.transpose(1, 2) @ D  # G^{1/2} Delta
        root_inv = (Q * w.rsqrt().unsqueeze(-2)) @ Q.transpose(1, 2)
    C = _damped(cov.to(D), damp)
    if out_f <= in_f:
        _, U = torch.linalg.eigh(D @ C @ D.transpose(1, 2))
        U = U.flip(-1)[..., :rank]
    else:
        M = D @ psd_root(C)
        s2, V = torch.linalg.eigh(M.transpose(1, 2) @ M)
        V, s = V.flip(-1)[..., :rank], s2.flip(-1)[..., :rank].clamp(min=0).sqrt()
        keep = s > s.amax(-1, keepdim=True).clamp(min=1e-300) * 1e-10
        U = (M @ V) * torch.where(keep, 1.0 / s.clamp(min=1e-300), torch.zeros_like(s)).unsqueeze(-2)
    A = U.transpose(1, 2) @ D  # [n, r, in]
    norms = A.norm(dim=-1)  # [n, r]
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))
    B = U * norms.unsqueeze(-2)
    if root_inv is not None:
        B = root_inv @ B
    A = A / scale.unsqueeze(-1)
    return B.to(delta.dtype).contiguous(), A.to(delta.dtype).contiguous()


def _damped(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """C + damp * mean(diag C) * I per matrix (the same ridge `activation_aware_factors` uses)."""
    if not damp:
        return cov
    mean_diag = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    return cov + damp * mean_diag.view(-1, 1, 1) * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)


def position_chunks(stack: torch.Tensor, budget: int = 1 << 29) -> list[slice]:
    """Slices over the first axis of a [L, out, in] stack, each small enough that the float64
    temporaries of its decomposition (about four copies) stay under `budget` bytes."""
    L, out_f, in_f = stack.shape
    per = 4 * 8 * (out_f * in_f + min(out_f, in_f) ** 2)
    k = max(1, min(L, budget // per))
    return [slice(i, min(L, i + k)) for i in range(0, L, k)]


@torch.no_grad()
def fit_shared(W: torch.Tensor, cov: torch.Tensor, slot_of_position, rank: int, damp: float = 0.01,
               iters: int = 2, normalise: bool = True) -> torch.Tensor:
    """Shared weights [num_slots, out, in] fitted to what the layers' outputs see.

    Minimises sum_l ||(W_l - W_s - B_l A_l) C_l^{1/2}||^2 over each slot's tied layers, jointly
    with the positions' rank-r corrections, by alternating the two closed forms: the factors
    (`activation_aware_factors`) for fixed W_s, and W_s = (sum_l R_l C_l)(sum_l C_l)^{-1} with
    R_l = W_l - B_l A_l for fixed factors. Starts from the plain average, and every half-step
    lowers the objective, so it never ends worse than the average's calibrated fit. At r = 0 it is
    the activation-weighted least-squares fit. `normalise` scales every C_l to unit mean diagonal
    first: without it the layers with the largest inputs decide the shared weight alone.
    """
    slots = torch.as_tensor(list(slot_of_position), device=W.device)
    num_slots = int(slots.max()) + 1
    C = cov.to(W.device, torch.float64, copy=True)  # damped and normalised in place: one float64 copy
    mean_diag = torch.diagonal(C, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    torch.diagonal(C, dim1=-2, dim2=-1).add_(damp * mean_diag.unsqueeze(-1))  # as `_damped`
    if normalise:
        C.div_(torch.diagonal(C, dim1=-2, dim2=-1).mean(-1).view(-1, 1, 1))
    Wd = W.double()
    shared = torch.stack([Wd[slots == s].mean(0) for s in range(num_slots)])
    for _ in range(max(1, iters) if rank > 0 else 1):
        R = Wd
        if rank > 0:  # a few positions at a time: one chunk's float64 temporaries, never all L's
            R = torch.empty_like(Wd)
            for idx in position_chunks(Wd):
                B, A = activation_aware_factors(Wd[idx] - shared[slots[idx]], C[idx], rank, damp=0.0)
                R[idx] = Wd[idx] - B @ A
        for s in range(num_slots):
            m = slots == s
            rhs = (R[m] @ C[m]).sum(0)  # [out, in]
            shared[s] = torch.linalg.solve(C[m].sum(0), rhs.T).T  # rhs (sum C)^{-1}, C symmetric
    return shared.to(W.dtype)


def calibration_sequences(sources, tokenizer, num_tokens: int = 16_384, seq_len: int = 256,
                          cache_dir: str | None = None) -> torch.Tensor:
    """[n, seq_len] token ids from the training side of `sources` (the documents the trainer
    would train on, never its held-out ones), at most `num_tokens` in all."""
    from ..data import DataConfig, DataError, build_datasets

    if num_tokens < seq_len:
        raise CalibrationError(f"calibration needs at least one sequence: num_tokens={num_tokens} < seq_len={seq_len}")
    try:
        train, _ = build_datasets(DataConfig(sources=list(sources), seq_len=seq_len, max_tokens=num_tokens,
                                             heldout_tokens=seq_len, cache_dir=cache_dir), tokenizer)
    except DataError as e:
        raise CalibrationError(f"calibration data: {e}") from e
    n = min(len(train), num_tokens // seq_len)
    return torch.stack([torch.as_tensor(train.sequence(i).astype("int64")) for i in range(n)])


def calibrate(source, tokenizer, sources, num_tokens: int = 16_384, seq_len: int = 256,
              progress: bool = True) -> CalibrationStats:
    """Statistics of `source` on `num_tokens` tokens of user text, cached under $RECURSIFY_CACHE."""
    from ..util.paths import cache_root

    seqs = calibration_sequences(sources, tokenizer, num_tokens, seq_len)
    return cached_stats(source, seqs, cache_root() / "calibration", progress=progress)
