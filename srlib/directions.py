"""Preference-relevant SAE directions: the paper's eq. 6-9 and the choice of F_w and F_l.

For the chosen (w) and rejected (l) responses of a preference set, each latent j gets an
activation frequency mu^j (the share of samples on which it fires, eq. 6-8) and a separation
score nabla_j = mu_w^j - mu_l^j, delta_j = -nabla_j (eq. 9). The K latents with the largest
nabla and the K with the largest delta are kept; their SAE decoder rows are the positive and
negative feature subspaces F_w and F_l onto which the reward model projects.

What the paper leaves open, and the choices made here:

* Tie-breaking. Latents are ranked by score, descending, and equal scores by latent index,
  ascending (a stable sort), so the same data always gives the same directions.
* Overlap. When at least K latents have nabla > 0 and at least K have nabla < 0, the two
  top-K sets cannot share a latent. They can only when one side runs short and fills up with
  zero (or opposite-signed) scores, e.g. on a tiny data set. By default the two sets are
  taken independently, as the paper writes them; `allow_overlap=False` takes I_w first and
  then the top K by delta among the latents not in I_w.
* Decoder-row normalisation. The default uses the raw decoder rows, as the paper does.
  SAEs trained by `srlib.sae.train_sae` (sae-lens TopK, saved for inference) already have
  unit-norm rows, so there the option changes nothing; other SAEs may not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from srlib.errors import ConfigError, DataError


def activation_frequencies(latents: Tensor) -> Tensor:
    """Eq. 6-8: for each latent, the fraction of rows (samples) on which it fires (> 0)."""
    if latents.ndim != 2:
        raise DataError(f"latents must be a 2-D [samples, d_sae] tensor, got shape {tuple(latents.shape)}")
    if latents.shape[0] == 0:
        raise DataError("cannot compute activation frequencies of an empty set of samples")
    return (latents > 0).float().mean(dim=0)


def separation_scores(mu_w: Tensor, mu_l: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 9: nabla = mu_w - mu_l (fires more on chosen) and delta = -nabla (more on rejected)."""
    if mu_w.shape != mu_l.shape:
        raise DataError(f"mu_w {tuple(mu_w.shape)} and mu_l {tuple(mu_l.shape)} differ in shape")
    nabla = mu_w - mu_l
    return nabla, -nabla


def rank_latents(scores: Tensor) -> Tensor:
    """Latent indices by score descending, equal scores by index ascending (stable sort)."""
    return torch.sort(-scores, stable=True).indices


@dataclass
class Directions:
    """The selected latents and their decoder rows.

    `vectors` is [2K, d]: the rows of F_w (latents `indices_w`, best first) followed by the rows
    of F_l (`indices_l`). `scores_w` = nabla at `indices_w`, `scores_l` = delta at `indices_l`.
    `mu_w`, `mu_l` are the frequencies of every latent, kept for plots and checks.
    """

    indices_w: Tensor
    indices_l: Tensor
    scores_w: Tensor
    scores_l: Tensor
    mu_w: Tensor
    mu_l: Tensor
    vectors: Tensor
    normalized: bool = False

    @property
    def k(self) -> int:
        """Directions per side."""
        return int(self.indices_w.numel())

    @property
    def indices(self) -> Tensor:
        """[I_w ; I_l], in the order of the rows of `vectors`."""
        return torch.cat([self.indices_w, self.indices_l])

    @property
    def F_w(self) -> Tensor:
        """The positive feature subspace, [K, d]."""
        return self.vectors[: self.k]

    @property
    def F_l(self) -> Tensor:
        """The negative feature subspace, [K, d]."""
        return self.vectors[self.k :]


def _decoder(sae_or_W_dec) -> Tensor:
    """The [d_sae, d_in] decoder matrix of an sae-lens SAE, or the matrix itself."""
    W_dec = sae_or_W_dec if isinstance(sae_or_W_dec, Tensor) else getattr(sae_or_W_dec, "W_dec", None)
    if not isinstance(W_dec, Tensor) or W_dec.ndim != 2:
        raise ConfigError("select_directions needs an sae-lens SAE or a 2-D [d_sae, d_in] decoder matrix")
    return W_dec.detach().float().cpu()


def select_directions(
    sae_or_W_dec,
    latents_w: Tensor,
    latents_l: Tensor,
    k: int = 128,
    *,
    normalize: bool = False,
    allow_overlap: bool = True,
) -> Directions:
    """Top-K latents by nabla and by delta from the chosen/rejected latents, and their decoder rows.

    `latents_w`, `latents_l`: SAE latent activations [n, d_sae] of the chosen and rejected
    samples (`srlib.sae.encode`). `normalize=True` scales each selected row to unit length.
    `allow_overlap=False` removes I_w from the candidates for I_l (see the module docstring).
    """
    W_dec = _decoder(sae_or_W_dec)
    d_sae = W_dec.shape[0]
    for name, latents in (("latents_w", latents_w), ("latents_l", latents_l)):
        if latents.ndim != 2 or latents.shape[1] != d_sae:
            raise ConfigError(f"{name} has shape {tuple(latents.shape)} but the SAE has {d_sae} latents")
    needed = k if allow_overlap else 2 * k
    if k < 1 or needed > d_sae:
        raise ConfigError(
            f"k={k} is out of range: the SAE has {d_sae} latents"
            + ("" if allow_overlap else " and allow_overlap=False needs 2k of them")
        )
    mu_w = activation_frequencies(latents_w)
    mu_l = activation_frequencies(latents_l)
    nabla, delta = separation_scores(mu_w, mu_l)
    indices_w = rank_latents(nabla)[:k]
    order_l = rank_latents(delta)
    if not allow_overlap:
        order_l = order_l[~torch.isin(order_l, indices_w)]
    indices_l = order_l[:k]
    indices = torch.cat([indices_w, indices_l])
    vectors = W_dec[indices].clone()
    if normalize:
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return Directions(
        indices_w=indices_w,
        indices_l=indices_l,
        scores_w=nabla[indices_w],
        scores_l=delta[indices_l],
        mu_w=mu_w,
        mu_l=mu_l,
        vectors=vectors,
        normalized=normalize,
    )
