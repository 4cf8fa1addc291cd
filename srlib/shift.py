"""Figure 5: how far policy-generated data sits from the training data, in two spaces.

The paper (§5.2) explains why DenseRM, slightly better on held-out pairs, filters worse during
alignment: the answers the policy generates differ from the training answers more in the
dense space (the hidden state z) than in the projection space (v_p = [z·F_w | z·F_l],
eq. 10-12). It measures that with the cosine similarity between generated and training data.

How the similarity is aggregated here (the paper does not say), per space, for each sample x
of a group (e.g. each generated answer) against the training samples t_j (chosen and rejected
answers of the training split):

* **"mean"**: the mean cosine similarity to ALL training samples, s(x) = mean_j cos(x, t_j),
  the reading closest to the paper's "average cosine similarity". It equals the dot product
  of x/|x| with the mean of the unit training vectors, so no n × m matrix is needed.
* **"nearest"**: the cosine similarity to the single most similar training sample,
  max_j cos(x, t_j): how close the nearest training example is.
* **centering** (`center=True`): the training mean is subtracted from every vector first.
  Hidden states of language models share a large common offset, which alone makes
  uncentered cosines high for every answer, raw projections even more so (chapter 6 prints
  the values for its backbone), so the uncentered "mean" mostly measures that offset. Centering asks whether x points
  the same way as the training data once the offset is removed. In the projection space centering is the same as
  projecting the centered states, since the projection is linear. Centered "mean" is uninformative by
  construction: the mean of the centered unit training vectors is close to zero, so every
  sample scores about 0.

The book's **primary** measure is therefore **"nearest", centered**: for each answer, the
cosine similarity to its most similar training answer after removing the training mean. The
uncentered "mean" is shown beside it as the paper-style number.

Cosines in spaces of different width (d = 576 vs 2K = 256 on SmolLM2) are not on one scale,
so each space is also measured on an in-distribution reference: held-out answers of the
same data set (the test split), and the shift of the generated data is expressed in units of
the reference spread (`shift_size`). `neighbour_share` gives a second, scale-free view: how
often a generated answer's nearest neighbours are other generated answers.

Also here: the keep/drop agreement of two reward models on generated pairs (what matters
for filtering) and the t-SNE embedding of Figure 5's appendix panels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from srlib.cache import clear_command, read_json, warn_recomputing
from srlib.data import Conversation, PreferencePair
from srlib.errors import ConfigError, DamagedFileError
from srlib.paths import atomic_path, cache_dir

AGGREGATES = ("mean", "nearest")


def _unit_rows(X: Tensor) -> Tensor:
    """Rows scaled to unit length (a zero row stays zero)."""
    X = X.float()
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _check_spaces(samples: Tensor, training: Tensor) -> None:
    if samples.ndim != 2 or training.ndim != 2 or samples.shape[1] != training.shape[1]:
        raise ConfigError(
            f"samples {tuple(samples.shape)} and training {tuple(training.shape)} must be 2-D with the same width"
        )
    if training.shape[0] == 0:
        raise ConfigError("the training set is empty")


def similarity_to_training(
    samples: Tensor, training: Tensor, *, aggregate: str = "mean", center: bool = False, chunk: int = 1024
) -> Tensor:
    """For each row x of `samples` [n, d], its cosine similarity to the training rows [m, d].

    aggregate="mean": mean_j cos(x, t_j) (the paper-style reading); "nearest": max_j cos(x, t_j)
    (with center=True, the book's primary measure: see the module docstring).
    center=True subtracts the mean training row from both sides first. Returns [n] float32.
    """
    _check_spaces(samples, training)
    if aggregate not in AGGREGATES:
        raise ConfigError(f"unknown aggregate {aggregate!r}; choose one of: {', '.join(AGGREGATES)}")
    samples, training = samples.float(), training.float()
    if center:
        mean = training.mean(dim=0, keepdim=True)
        samples, training = samples - mean, training - mean
    x, t = _unit_rows(samples), _unit_rows(training)
    if aggregate == "mean":
        return x @ t.mean(dim=0)
    return torch.cat([(x[i : i + chunk] @ t.T).max(dim=1).values for i in range(0, len(x), chunk)])


def projection_space(Z: Tensor, directions) -> Tensor:
    """v_p = Z @ [F_w ; F_l].T (eq. 10-12): the space SparseRM's head reads (before standardising)."""
    return Z.float() @ directions.vectors.T


def similarity_frame(spaces: Mapping[str, Mapping[str, Tensor]], *, training: str = "training", center: bool = False):
    """Long table of similarities: one row per (space, group, aggregate, sample).

    `spaces` maps a space name to {group name: [n, width] vectors}; the group named
    `training` is what every other group is compared with. Columns: space, group, aggregate,
    centered, similarity.
    """
    import pandas as pd

    frames = []
    for space, groups in spaces.items():
        if training not in groups:
            raise ConfigError(f"space {space!r} has no {training!r} group")
        for group, vectors in groups.items():
            if group == training:
                continue
            for aggregate in AGGREGATES:
                values = similarity_to_training(vectors, groups[training], aggregate=aggregate, center=center)
                frames.append(
                    pd.DataFrame(
                        {
                            "space": space,
                            "group": group,
                            "aggregate": aggregate,
                            "centered": center,
                            "similarity": values.numpy(),
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def similarity_summary(frame):
    """Mean, sd and count of the similarity per (space, group, aggregate, centered)."""
    keys = ["space", "group", "aggregate", "centered"]
    return frame.groupby(keys, sort=False)["similarity"].agg(["mean", "std", "count"]).reset_index()


def shift_size(reference: Tensor, shifted: Tensor) -> dict[str, float]:
    """How far one group's similarities fall below a reference group's, on a scale that can be
    compared across spaces.

    `reference`, `shifted`: per-sample similarities (e.g. held-out and generated answers, from
    `similarity_to_training`). Returns drop = mean(reference) - mean(shifted); standardised =
    drop / sd(reference) (in units of the reference spread, so spaces whose cosines live on
    different scales become comparable); se = the standard error of `standardised` from the
    sampling of both groups, sqrt(var_r / n_r + var_s / n_s) / sd(reference).
    """
    reference, shifted = torch.as_tensor(reference).double().flatten(), torch.as_tensor(shifted).double().flatten()
    if reference.numel() < 2 or shifted.numel() < 2:
        raise ConfigError("shift_size needs at least two similarities in each group")
    scale = reference.std().clamp_min(1e-12)
    drop = reference.mean() - shifted.mean()
    se = (reference.var() / reference.numel() + shifted.var() / shifted.numel()).sqrt() / scale
    return {"drop": float(drop), "standardised": float(drop / scale), "se": float(se)}


def neighbour_share(reference: Tensor, shifted: Tensor, *, k: int = 10, center: bool = True) -> dict[str, float]:
    """How much the `shifted` samples keep to themselves: for each row of `shifted`, the share of
    its k nearest neighbours (cosine, among all rows of both sets but itself) that are `shifted`
    rows too, averaged. Without any shift the two sets are mixed and the share is about the
    chance level (n_s - 1) / (n_r + n_s - 1); a separate cluster drives it towards 1.

    center=True subtracts the mean of `reference` first. Returns {"share", "chance"}.
    """
    _check_spaces(shifted, reference)
    n_r, n_s = len(reference), len(shifted)
    if not 1 <= k <= n_r + n_s - 1 or n_s < 2:
        raise ConfigError(f"k={k} needs 1 <= k < {n_r + n_s} samples, and at least two shifted samples")
    X = torch.cat([reference.float(), shifted.float()])
    if center:
        X = X - reference.float().mean(dim=0, keepdim=True)
    units = _unit_rows(X)
    cos = units[n_r:] @ units.T
    cos[torch.arange(n_s), n_r + torch.arange(n_s)] = -float("inf")  # not its own neighbour
    neighbours = cos.topk(k, dim=1).indices
    return {"share": float((neighbours >= n_r).float().mean()), "chance": (n_s - 1) / (n_r + n_s - 1)}


# ---------------------------------------------------------------------------------------------
# Agreement of two reward models on generated pairs


def keep_decisions(s_w: Tensor, s_l: Tensor) -> Tensor:
    """The filter's verdict per pair (§3.3): keep iff s_w > s_l strictly. Bool [n]."""
    if s_w.shape != s_l.shape or s_w.ndim != 1:
        raise ConfigError(f"scores must be two 1-D tensors of one shape, got {tuple(s_w.shape)} and {tuple(s_l.shape)}")
    return s_w > s_l


def agreement_counts(keep_a: Tensor, keep_b: Tensor) -> dict[str, float]:
    """How two filters' keep decisions compare: the counts of each case and the agreement rate.

    Returns {"both keep", "only A keeps", "only B keeps", "both drop"} (counts) and
    "agreement" (share of pairs where the decisions are equal), "keep A", "keep B" (shares).
    """
    keep_a, keep_b = torch.as_tensor(keep_a, dtype=torch.bool), torch.as_tensor(keep_b, dtype=torch.bool)
    if keep_a.shape != keep_b.shape or keep_a.numel() == 0:
        raise ConfigError(
            f"two non-empty decision vectors of one shape are needed, got "
            f"{tuple(keep_a.shape)} and {tuple(keep_b.shape)}"
        )
    n = keep_a.numel()
    return {
        "both keep": int((keep_a & keep_b).sum()),
        "only A keeps": int((keep_a & ~keep_b).sum()),
        "only B keeps": int((~keep_a & keep_b).sum()),
        "both drop": int((~keep_a & ~keep_b).sum()),
        "agreement": float((keep_a == keep_b).float().mean()),
        "keep A": float(keep_a.float().sum() / n),
        "keep B": float(keep_b.float().sum() / n),
    }


def score_relation(scores_a: Tensor, scores_b: Tensor) -> dict[str, float]:
    """How the scores of two reward models on the same texts relate: Pearson and Spearman
    correlation, and the scale ratio sd(a) / sd(b). Two models that differ only by a positive
    rescaling give correlations of 1 and a ratio equal to the factor."""
    from scipy import stats

    a, b = scores_a.double().flatten(), scores_b.double().flatten()
    if a.shape != b.shape or a.numel() < 2:
        raise ConfigError(f"two score vectors of one length >= 2 are needed, got {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = a.numpy(), b.numpy()
    # scipy.stats: Spearman ranks tied scores by their average rank; a constant vector has no
    # correlation (NaN, with scipy's ConstantInputWarning).
    return {
        "pearson": float(stats.pearsonr(x, y).statistic),
        "spearman": float(stats.spearmanr(x, y).statistic),
        "scale": float(a.std() / b.std().clamp_min(1e-300)),
    }


def pairwise_agreement(decisions: Mapping[tuple[str, int], Tensor]):
    """Agreement of every two filters given as {(method, seed): keep [n]}.

    One row per unordered pair of filters: method_a, seed_a, method_b, seed_b, comparison
    ("A vs B" across methods with the same seed, "A vs A" across seeds of one method) and
    agreement. Cross-method rows pair equal seeds only, so every seed counts once.
    """
    import pandas as pd

    keys = list(decisions)
    rows = []
    for i, (method_a, seed_a) in enumerate(keys):
        for method_b, seed_b in keys[i + 1 :]:
            same = method_a == method_b
            if not same and seed_a != seed_b:
                continue
            counts = agreement_counts(decisions[(method_a, seed_a)], decisions[(method_b, seed_b)])
            rows.append(
                {
                    "method_a": method_a,
                    "seed_a": seed_a,
                    "method_b": method_b,
                    "seed_b": seed_b,
                    "comparison": f"{method_a} vs {method_b}" + (" (other seed)" if same else ""),
                    "agreement": counts["agreement"],
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# t-SNE


def tsne_embedding(
    X: Tensor | np.ndarray, *, seed: int = 0, perplexity: float = 30.0, metric: str = "cosine", pca_dims: int = 50
) -> np.ndarray:
    """A 2-D t-SNE embedding [n, 2] of the rows of X (sklearn), deterministic given `seed`.

    The rows are first reduced to `pca_dims` principal components (after centering) when X is
    wider, which keeps t-SNE fast and removes noise dimensions. The perplexity is capped at
    (n - 1) / 3 so that small sets (smoke runs) still embed. `metric="cosine"` matches the
    similarity of Figure 5.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rows = X.detach().float().cpu().numpy() if isinstance(X, Tensor) else np.asarray(X, dtype=np.float32)
    n = rows.shape[0]
    if rows.ndim != 2 or n < 4:
        raise ConfigError(f"t-SNE needs a 2-D array with at least 4 rows, got shape {rows.shape}")
    if rows.shape[1] > pca_dims and n > pca_dims:
        rows = PCA(n_components=pca_dims, random_state=seed).fit_transform(rows - rows.mean(axis=0))
    perplexity = min(perplexity, (n - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, metric=metric, init="pca", random_state=seed).fit_transform(rows)


# ---------------------------------------------------------------------------------------------
# Policy-generated pairs, cached


def generated_pairs(
    model,
    tokenizer,
    prompts: Sequence[str | Conversation],
    shots: Sequence[PreferencePair],
    config,
    *,
    model_identity: str,
    round_index: int = 1,
    cache: bool = True,
    progress: bool = True,
) -> list[PreferencePair]:
    """`srlib.alignment.generate_tuples` for `prompts`, cached on disk.

    Generation is the slow part of Figure 5 on a CPU, and with seeded sampling the answers are
    a function of the model, prompts, shots and generation settings, so they are stored under
    `cache_dir("generated")` keyed by exactly those and read back on later runs.
    """
    from srlib.alignment import generate_tuples

    settings = {
        "model": model_identity,
        "prompts": list(prompts),
        "shots": [[s.prompt, s.chosen, s.rejected] for s in shots],
        "round": round_index,
        **{
            name: getattr(config, name)
            for name in ("track", "max_new_tokens", "temperature", "top_p", "generation_batch_size", "seed")
        },
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    path = cache_dir("generated") / f"{key}.json"
    if cache and path.exists():
        try:
            return [PreferencePair(**record) for record in read_json(path, clear_command("generated"))]
        except (DamagedFileError, TypeError) as error:  # not JSON, or not a list of pairs
            warn_recomputing(path, error)  # generated again below and rewritten
    pairs = generate_tuples(model, tokenizer, prompts, shots, config, round_index=round_index, progress=progress)
    if cache:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps([dataclasses.asdict(pair) for pair in pairs]))
    return pairs


def policy_pairs(
    backbone, config, n_prompts: int, *, cache: bool = True, progress: bool = True
) -> list[PreferencePair]:
    """The policy (the backbone itself) answers `n_prompts` generation prompts of `config`'s
    track twice, GRATH-style: once asked for a good answer (y_w), once for a bad one (y_l).

    The prompts are ones no reward model sees (`srlib.data.generation_prompts`, like the
    paper's 1,000 sampled Red-Teaming examples) and the few-shot examples training pairs, as
    in chapter 7's first alignment round (`srlib.alignment.prompts_and_shots`), so the
    generated pairs are the data a reward model filters there.
    """
    from srlib.alignment import prompts_and_shots

    if n_prompts < 1:
        raise ConfigError(f"n_prompts must be at least 1, got {n_prompts}")
    config = config.replace(n_prompts=n_prompts)
    prompts, shots = prompts_and_shots(config)
    return generated_pairs(
        backbone.model,
        backbone.tokenizer,
        prompts,
        shots,
        config,
        model_identity=backbone.identity,
        cache=cache,
        progress=progress,
    )
