"""sae-lens's TopK and BatchTopK training SAEs, with their training step decoding only the
kept latents.

A TopK SAE keeps k of its d_sae latents per row (k = 32 of 9,216 in the cpu profile), a
BatchTopK SAE k per row on average over the batch, yet sae-lens's `TopKTrainingSAE` and
`BatchTopKTrainingSAE` scatter them into a dense [batch, d_sae] tensor, rescale that tensor by
the decoder norms and multiply it by the whole decoder, forward and backward, and their AuxK
loss does the same for the dead latents. On a CPU a step is bound by those passes (the matrix
products were about a tenth of a step under bfloat16 autocast), and sae-lens's own sparse
option (`use_sparse_activations`, TopK only) fails in backward under autocast on the CPU.

`GatherTopKTrainingSAE` and `GatherBatchTopKTrainingSAE` compute the same function from the
kept (value, latent) pairs: the decoder rows are gathered and summed per row with their values
as weights (`F.embedding_bag`), the decoder-norm rescaling is applied to the kept values rather
than to a dense tensor, and the AuxK loss ranks and decodes only the dead latents' columns.
Outside the training step (`encode`, `decode`, saving) they are sae-lens's classes unchanged,
so a trained SAE saves and loads as sae-lens saves it (TopK as TopK, BatchTopK as JumpReLU).
The step's time against sae-lens's: `python benchmarks/sae_step.py`; `tests/test_sae.py` checks
that the loss, the gradients and BatchTopK's threshold agree with sae-lens's step on the same
weights and batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE
from torch import Tensor


class _StepLatents(NamedTuple):
    """What one training step's encode hands to its decode, AuxK loss and threshold update."""

    feature_acts: Tensor  # sparse COO, no gradient: what sae-lens's trainer counts firings from
    values: Tensor  # [n_kept] after the ReLU, row by row
    latents: Tensor  # [n_kept] latent ids, in the same order
    offsets: Tensor  # [rows] where each row's kept latents start in `values` / `latents`
    decoder_norm: Tensor | None  # ||W_dec[i]|| when the decoder norm rescales activations, else None


class _GatherStep:
    """The training step of a TopK-family SAE computed from its kept (value, latent) pairs; mixed
    into sae-lens's training class (first in the bases), which supplies everything else. A
    subclass says which pre-activations are kept (`_keep`)."""

    cfg: Any
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    d_head: Any
    hook_sae_acts_pre: Any
    hook_sae_acts_post: Any
    hook_sae_recons: Any
    process_sae_in: Any
    run_time_activation_norm_fn_out: Any
    reshape_fn_out: Any

    # set for the duration of one training step (the decoder norm is computed once per step)
    _in_step: bool = False
    _active: _StepLatents | None = None

    def _keep(self, hidden_pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(values after the ReLU, latent ids, row ids) of the kept pre-activations, ordered by row."""
        raise NotImplementedError

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if self._acts_post_hooked():
            return super().training_forward_pass(step_input)  # type: ignore[misc]
        self._in_step = True
        try:
            return super().training_forward_pass(step_input)  # type: ignore[misc]
        finally:
            self._in_step, self._active = False, None

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self._in_step:
            return super().encode_with_hidden_pre(x)  # type: ignore[misc]
        sae_in = self.process_sae_in(x)
        norm = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        if norm is not None:
            # (x W_enc + b_enc) * norm, with the norm folded into the [d_in, d_sae] weights
            hidden_pre = self.hook_sae_acts_pre(sae_in @ (self.W_enc * norm) + self.b_enc * norm)
        else:
            hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        values, latents, rows = self._keep(hidden_pre)
        with torch.no_grad():
            feature_acts = torch.sparse_coo_tensor(
                torch.stack([rows, latents]), values.detach(), hidden_pre.shape, check_invariants=False
            )
            counts = torch.bincount(rows, minlength=len(hidden_pre))
            offsets = counts.cumsum(0) - counts
        self._active = _StepLatents(feature_acts, values, latents, offsets, norm)
        return feature_acts, hidden_pre

    def decode(self, feature_acts: Tensor) -> Tensor:
        step = self._active
        if step is None or feature_acts is not step.feature_acts:
            return super().decode(feature_acts)  # type: ignore[misc]
        weights = step.values.to(self.W_dec.dtype)
        if step.decoder_norm is not None:  # the kept values over unit-norm decoder rows
            # index_select, not decoder_norm[latents]: on the CPU the backward of advanced
            # indexing adds up a repeated latent's terms in the order its threads finish, so two
            # threads trained another SAE on every run; index_select's backward has a fixed order
            weights = weights / step.decoder_norm.index_select(0, step.latents)
        sae_out = (
            F.embedding_bag(step.latents, self.W_dec, step.offsets, per_sample_weights=weights, mode="sum") + self.b_dec
        )
        sae_out = self.hook_sae_recons(sae_out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    def calculate_topk_aux_loss(
        self, sae_in: Tensor, sae_out: Tensor, hidden_pre: Tensor, dead_neuron_mask: Tensor | None
    ) -> Tensor:
        """sae-lens's AuxK loss (the top k_aux dead latents reconstruct the live ones' residual),
        over the dead latents' columns only instead of all columns with the others at -inf."""
        if self._active is None:
            return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)  # type: ignore[misc]
        if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)  # type: ignore[misc]
        residual = (sae_in - sae_out).detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        dead = dead_neuron_mask.nonzero().squeeze(1)
        values, positions = hidden_pre.index_select(-1, dead).topk(min(k_aux, num_dead), dim=-1, sorted=False)
        # k_aux (d_in / 2) latents per row: a product over the dead latents' decoder rows was
        # cheaper than gathering k_aux rows per row (forward and backward at 6,734 dead of 9,216
        # latents, one thread: 99 against 143 ms, a one-off measurement)
        if self._active.decoder_norm is not None:  # index_select for a fixed-order backward (`decode`)
            dead_norm = self._active.decoder_norm.index_select(0, dead)
            values = values / dead_norm.index_select(0, positions.flatten()).view_as(positions)
        acts = torch.zeros(len(values), num_dead, dtype=values.dtype, device=values.device)
        recons = self.reshape_fn_out(
            acts.scatter(-1, positions, values) @ self.W_dec.index_select(0, dead), self.d_head
        )
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    def _acts_post_hooked(self) -> bool:
        """Whether a hook reads the dense activations (then sae-lens's own step runs)."""
        hook = self.hook_sae_acts_post
        return bool(hook._forward_hooks) or bool(hook._backward_hooks)


class GatherTopKTrainingSAE(_GatherStep, TopKTrainingSAE):
    """`TopKTrainingSAE` whose `training_forward_pass` decodes by gather (see the module docstring).

    The step's `feature_acts` (used by sae-lens's trainer only to count which latents fired) is
    a sparse COO tensor without gradient, the form sae-lens's trainer accepts from its own
    sparse option; the gradients flow through the k values."""

    def _keep(self, hidden_pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The k largest pre-activations of each row, then the ReLU (sae-lens's `TopK`)."""
        values, latents = hidden_pre.topk(self.cfg.k, dim=-1, sorted=False)
        rows = torch.arange(len(latents), device=latents.device).repeat_interleave(self.cfg.k)
        return values.relu().flatten(), latents.flatten(), rows


class GatherBatchTopKTrainingSAE(_GatherStep, BatchTopKTrainingSAE):
    """`BatchTopKTrainingSAE` whose `training_forward_pass` decodes by gather: the k × rows
    largest activations of the whole batch after the ReLU (sae-lens's `BatchTopK`), so a row
    keeps any number of latents; its threshold is updated from the kept values as sae-lens
    updates it from its dense activations."""

    topk_threshold: Tensor  # sae-lens's buffer (declared there too; the mixin hides it from mypy)

    def _keep(self, hidden_pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d_sae = hidden_pre.shape[-1]
        values, flat = hidden_pre.relu().flatten().topk(int(self.cfg.k * len(hidden_pre)), sorted=False)
        flat, order = flat.sort()  # row by row, as the decode's bags need
        return values[order], flat % d_sae, flat // d_sae

    @torch.no_grad()
    def update_topk_threshold(self, acts_topk: Tensor) -> None:
        step = self._active
        if step is None or acts_topk is not step.feature_acts:
            return super().update_topk_threshold(acts_topk)
        positive = step.values[step.values > 0]
        if len(positive):
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * positive.min().to(self.topk_threshold.dtype)


#: The training class of each sae-lens architecture (`SAETrainingConfig.architecture`) that has a
#: gather step; `srlib.sae` trains the others with sae-lens's own classes.
GATHER_CLASSES: dict[str, type] = {"topk": GatherTopKTrainingSAE, "batchtopk": GatherBatchTopKTrainingSAE}
