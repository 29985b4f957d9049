"""A learned exit rule (CALM, Schuster et al. 2022): one linear probe per loop boundary.

Confidence and entropy exits run the whole LM head (49k columns on SmolLM2) on every row they
offer an exit, so a row that stays pays for a head it never uses; saturation reads no head but on
a 2-loop model the two loop ends are never similar enough for it to fire. The probe reads the
residual stream at a loop end after the model's final norm (`model.final_norm`, the one
`exit_logits` applies: the scale does not drift with depth) and estimates the probability that the
exit head's argmax there equals the full-depth argmax: one dot product per row, no head.

`fit_exit_classifier` labels real text with the model itself and fits each probe by logistic
regression; `calibrate_threshold` picks the smallest threshold whose exits keep a target agreement
on held-out tokens. With more than two loops ONE threshold serves every boundary (a token leaves at
the first boundary whose probe reaches it), and calibration simulates exactly that cascade. Files,
next to the checkpoint: `exit_classifier.safetensors` (weights, no pickle), `exit_classifier.json`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_FILE = "exit_classifier.safetensors"
META_FILE = "exit_classifier.json"
FIT_HINT = "make one with `recursify exits fit CHECKPOINT --data TEXT`"


class ExitClassifierError(ValueError):
    """A missing, unreadable or mismatched exit classifier; the message is one line."""


class ExitClassifier(nn.Module):
    """Probe b (0-based) reads rows that just finished loop b, i.e. loop boundary b + 1.
    `meta` is what the json holds (threshold, target agreement, held-out measurements)."""

    def __init__(self, hidden_size: int, num_boundaries: int, meta: dict | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_boundaries, hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_boundaries), requires_grad=False)
        self.meta = dict(meta or {})

    @property
    def num_boundaries(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def threshold(self) -> float | None:
        """The calibrated threshold from the json (None if it was never calibrated)."""
        return self.meta.get("threshold")

    def logits(self, features: torch.Tensor, loops) -> torch.Tensor:
        """[n, d] final-normed states, each row's loop (int or one per row) -> [n] float32 logits.
        Scored in float32 whatever the weights' dtype, as the other policies score."""
        if not isinstance(loops, int):  # each row's own probe; no index tensor when there is one probe
            loops = 0 if self.num_boundaries == 1 else torch.as_tensor(loops, dtype=torch.long, device=self.weight.device)
        return (features.float() * self.weight[loops].float()).sum(-1) + self.bias[loops].float()

    def forward(self, features: torch.Tensor, loops) -> torch.Tensor:
        """Probability that the exit head's argmax here is the full-depth one."""
        return torch.sigmoid(self.logits(features, loops))

    def check(self, model) -> None:
        """Raise ExitClassifierError (one line) unless the probes fit `model`'s boundaries and width."""
        loops, width = model.layout.num_loops, model.arch.hidden_size
        if (self.num_boundaries, self.hidden_size) != (loops - 1, width):
            raise ExitClassifierError(
                f"the exit classifier has {self.num_boundaries} loop boundaries of hidden size {self.hidden_size}, but "
                f"the model has {loops - 1} ({loops} loops) of hidden size {width}; refit it: {FIT_HINT}")

    def bind(self, model) -> "ExitClassifier":
        """Checked against `model` and moved to its device and dtype (in place)."""
        self.check(model)
        param = model.embed_tokens.weight
        return self.to(device=param.device, dtype=param.dtype)

    def save(self, folder: str | os.PathLike) -> None:
        """Write both files into `folder`, each through a temporary name (never half written)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        meta = {**self.meta, "hidden_size": self.hidden_size, "boundaries": list(range(1, self.num_boundaries + 1))}
        save_file({"weight": self.weight.detach().float().cpu().contiguous(), "bias": self.bias.detach().float().cpu()},
                  folder / (CLASSIFIER_FILE + ".tmp"), metadata={"format": "recursify-exit-classifier-1"})
        (folder / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=2) + "\n")
        for name in (CLASSIFIER_FILE, META_FILE):
            os.replace(folder / (name + ".tmp"), folder / name)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ExitClassifier":
        """Read the two files of `folder`; ExitClassifierError (one line) if missing or malformed."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / CLASSIFIER_FILE
        if not path.is_file():
            raise ExitClassifierError(f"{folder}: no {CLASSIFIER_FILE} for exit mode 'classifier'; {FIT_HINT}")
        try:
            tensors = load_file(path)
            meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
            raise ExitClassifierError(f"{path}: unreadable ({type(e).__name__}); {FIT_HINT}") from None
        w, b = tensors.get("weight"), tensors.get("bias")
        if w is None or b is None or w.dim() != 2 or tuple(b.shape) != (w.shape[0],):
            raise ExitClassifierError(f"{path}: not an exit classifier (needs weight [boundaries, hidden] and bias); {FIT_HINT}")
        t = meta.get("threshold")
        if t is not None and not (isinstance(t, (int, float)) and 0 < t <= 1):
            raise ExitClassifierError(f"{folder / META_FILE}: threshold must be in (0, 1], got {t!r}; {FIT_HINT}")
        clf = cls(w.shape[1], w.shape[0], meta)
        clf.weight.data, clf.bias.data = w.float(), b.float()
        return clf


# ---------------------------------------------------------------------------- fitting
@torch.no_grad()
def collect_features(model, input_ids_batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced features and labels over every position of the [n, T] id batches, on the
    model's device: ([B-1, N, d] final-normed loop-end states in float32, [N, B-1] bool "the exit
    head's argmax at boundary b is the full-depth argmax")."""
    layout = model.layout
    if not layout.loopable or layout.num_loops < 2:
        raise ExitClassifierError(f"strategy {layout.strategy!r} with {layout.num_loops} loop(s) has no loop boundary "
                                  "to exit at; exit classifiers need a cycle strategy with 2+ loops")
    device, d = model.embed_tokens.weight.device, model.arch.hidden_size
    feats, agree = [], []
    for ids in input_ids_batches:
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        ids = ids[None] if ids.dim() == 1 else ids
        out = model(ids, output_loop_states=True, use_cache=False)
        final = out.logits.argmax(-1).reshape(-1)
        states = out.loop_hidden_states[:-1]
        feats.append(torch.stack([model.final_norm(s).float().reshape(-1, d) for s in states]))
        # The head one sequence at a time: [T, V] logits, never [n, T, V] per boundary.
        early = [torch.cat([model.exit_logits(row).argmax(-1) for row in s]) for s in states]
        agree.append(torch.stack([e == final for e in early], dim=1))
    if not feats:
        raise ExitClassifierError("no token sequences to fit or measure the exit classifier on")
    return torch.cat(feats, 1), torch.cat(agree, 0)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 200, l2: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression of bool y [N] on x [N, d]: (w [d], b), full-batch L-BFGS.

    Features are standardised for the optimiser (folded back after). The classes get equal total
    weight, so a rare class is not ignored; the bias is then shifted by log(n_neg / n_pos) (prior
    correction), so the output is a probability under the real class balance again. One class
    only: no direction to learn, w = 0 and the bias is the smoothed base rate."""
    x, y = x.float(), y.bool()
    n, pos = y.numel(), int(y.sum())
    neg = n - pos
    if pos == 0 or neg == 0:
        return torch.zeros(x.shape[1], device=x.device), torch.tensor(math.log((pos + 0.5) / (neg + 0.5)), device=x.device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z, target = (x - mean) / std, y.float()
    weights = torch.where(y, n / (2.0 * pos), n / (2.0 * neg))
    w = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros((), device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, target, weight=weights) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = w.detach() / std
    return w_raw, b.detach() - (w_raw * mean).sum() - math.log(neg / pos)


def fit_exit_classifier(model, input_ids_batches, *, steps: int = 200, l2: float = 1e-6) -> ExitClassifier:
    """One probe per loop boundary of `model`, fitted on its own predictions over the id batches."""
    x, y = collect_features(model, input_ids_batches)
    meta = {"tokens_fitted": int(y.shape[0]), "fit_agree_rate": [float(r) for r in y.float().mean(0)]}
    clf = ExitClassifier(x.shape[2], x.shape[0], meta).to(x.device)
    for b in range(x.shape[0]):
        clf.weight.data[b], clf.bias.data[b] = fit_probe(x[b], y[:, b], steps, l2)
    return clf


@torch.no_grad()
def predict(clf: ExitClassifier, model, input_ids_batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out ([N, B-1] probabilities, [N, B-1] agreement labels) for `calibrate_threshold`."""
    x, y = collect_features(model, input_ids_batches)
    clf = clf.to(x.device)
    return torch.stack([clf(x[b], b) for b in range(x.shape[0])], dim=1), y


# ---------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """The threshold, and what it did on the held-out tokens (non-exits count as agreeing)."""

    threshold: float
    exit_rate: float  # share of tokens leaving before full depth
    agreement: float  # share of tokens equal to the full-depth prediction
    met: bool  # agreement >= target (False only when no threshold in (0, 1] reaches it)
    boundary_exit_rate: tuple[float, ...]  # per boundary: share of all tokens leaving there
    boundary_agreement: tuple[float, ...]  # per boundary: agreement of the tokens leaving there (1.0 if none)


def _measure(p: torch.Tensor, a: torch.Tensor, t: float, target: float) -> Calibration:
    """The cascade at threshold t: each token leaves at its first boundary with p >= t."""
    n, nb = p.shape
    hit = p >= t
    first = torch.where(hit.any(1), hit.to(torch.int8).argmax(1), nb)
    rates, agrees, wrong = [], [], 0
    for b in range(nb):
        out = first == b
        k, ok = int(out.sum()), int((out & a[:, b]).sum())
        rates.append(k / n)
        agrees.append(ok / k if k else 1.0)
        wrong += k - ok
    agreement = (n - wrong) / n
    return Calibration(float(t), int((first < nb).sum()) / n, agreement, agreement >= target - 1e-12,
                       tuple(rates), tuple(agrees))


def _check_target(target) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target agreement must be a number in (0, 1], got {target!r}")


def calibrate_threshold(probs, agree, target: float) -> Calibration:
    """The smallest threshold t in (0, 1] whose exits keep agreement >= target on these tokens.

    probs, agree: [N] (one boundary) or [N, B-1] (a shared t, exits cascade: a token leaves at
    its first boundary with prob >= t, else runs full depth and agrees). The exits only change
    at the probabilities themselves, so t is one of them: any t' in (next lower prob, t] makes
    the same decisions. When none reaches the target, t = 1.0 (`met` says whether even that did)."""
    _check_target(target)
    p = torch.as_tensor(probs).detach().double().cpu()
    a = torch.as_tensor(agree).detach().bool().cpu()
    p, a = (p[:, None], a[:, None]) if p.dim() == 1 else (p, a)
    if p.shape != a.shape or p.numel() == 0:
        raise ValueError(f"probs {tuple(p.shape)} and agree {tuple(a.shape)} must be the same non-empty shape")
    # Token i leaves at boundary b exactly for t in (lo, hi]: hi = p[i, b], lo = max(p[i, :b]).
    lo = torch.cat([torch.zeros_like(p[:, :1]), p.cummax(1).values[:, :-1]], 1)
    wrong_exit = (p > lo) & ~a
    his, los = p[wrong_exit].sort().values, lo[wrong_exit].sort().values
    cand = torch.unique(p[p > 0])
    # Wrong exits at t: intervals with lo < t <= hi = #(hi >= t) - #(lo >= t), as lo < hi.
    wrong = (len(his) - torch.searchsorted(his, cand)) - (len(los) - torch.searchsorted(los, cand))
    ok = (p.shape[0] - wrong).double() / p.shape[0] >= target - 1e-12
    t = float(cand[int(ok.nonzero()[0])]) if bool(ok.any()) else 1.0
    return _measure(p, a, t, target)


def fit_and_calibrate(model, fit_batches, heldout_batches, target: float, *, steps: int = 200
                      ) -> tuple[ExitClassifier, Calibration]:
    """What `recursify exits fit` runs: fit on `fit_batches`, calibrate on `heldout_batches` for
    `target` agreement, and record the threshold and its held-out measurements in `meta` (the json)."""
    _check_target(target)  # before the forward passes, not after
    clf = fit_exit_classifier(model, fit_batches, steps=steps)
    probs, agree = predict(clf, model, heldout_batches)
    cal = calibrate_threshold(probs, agree, target)
    clf.meta.update(threshold=cal.threshold, target_agreement=target, heldout_tokens=int(agree.shape[0]),
                    heldout_exit_rate=cal.exit_rate, heldout_agreement=cal.agreement, target_met=cal.met,
                    boundary_exit_rate=list(cal.boundary_exit_rate), boundary_agreement=list(cal.boundary_agreement))
    return clf, cal
