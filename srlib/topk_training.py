"""sae-lens's TopK training SAE, with its training step decoding only the k active latents.

A TopK SAE keeps k of its d_sae latents per row (k = 32 of 9,216 in the cpu profile), yet
sae-lens's `TopKTrainingSAE` scatters them into a dense [batch, d_sae] tensor, rescales that
tensor by the decoder norms and multiplies it by the whole decoder, forward and backward, and
its AuxK loss does the same for the dead latents. On a CPU a step is bound by those passes
(the matrix products were about a tenth of a step under bfloat16 autocast), and sae-lens's own
sparse option (`use_sparse_activations`) fails in backward under autocast on the CPU.

`GatherTopKTrainingSAE` computes the same function from the k (value, latent) pairs: the
decoder rows are gathered and summed with their values as weights (`F.embedding_bag`), the
decoder-norm rescaling is applied to the k values rather than to a dense tensor, and the AuxK
loss ranks and decodes only the dead latents' columns. Outside the training step (`encode`,
`decode`, saving) it is sae-lens's class unchanged, so a trained SAE saves and loads as a plain
TopK SAE.
The step's time against sae-lens's: `python benchmarks/sae_step.py`; `tests/test_sae.py` checks
that the loss and the gradients agree with sae-lens's step on the same weights and batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE
from torch import Tensor


class _StepLatents(NamedTuple):
    """What one training step's encode hands to its decode and AuxK loss."""

    feature_acts: Tensor  # sparse COO, no gradient: what sae-lens's trainer counts firings from
    values: Tensor  # [rows, k] after the ReLU
    latents: Tensor  # [rows, k] latent ids
    decoder_norm: Tensor | None  # ||W_dec[i]|| when the decoder norm rescales activations, else None


class GatherTopKTrainingSAE(TopKTrainingSAE):
    """`TopKTrainingSAE` whose `training_forward_pass` decodes by gather (see the module docstring).

    The step's `feature_acts` (used by sae-lens's trainer only to count which latents fired) is
    a sparse COO tensor without gradient, the form sae-lens's trainer accepts from its own
    sparse option; the gradients flow through the k values."""

    # set for the duration of one training step (the decoder norm is computed once per step)
    _in_step: bool = False
    _active: _StepLatents | None = None

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if self._acts_post_hooked():
            return super().training_forward_pass(step_input)
        self._in_step = True
        try:
            return super().training_forward_pass(step_input)
        finally:
            self._in_step, self._active = False, None

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self._in_step:
            return super().encode_with_hidden_pre(x)
        sae_in = self.process_sae_in(x)
        norm = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        if norm is not None:
            # (x W_enc + b_enc) * norm, with the norm folded into the [d_in, d_sae] weights
            hidden_pre = self.hook_sae_acts_pre(sae_in @ (self.W_enc * norm) + self.b_enc * norm)
        else:
            hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        values, latents = hidden_pre.topk(self.cfg.k, dim=-1, sorted=False)
        values = values.relu()
        with torch.no_grad():
            rows = torch.arange(len(latents), device=latents.device).repeat_interleave(self.cfg.k)
            feature_acts = torch.sparse_coo_tensor(
                torch.stack([rows, latents.flatten()]),
                values.detach().flatten(),
                hidden_pre.shape,
                check_invariants=False,
            )
        self._active = _StepLatents(feature_acts, values, latents, norm)
        return feature_acts, hidden_pre

    def decode(self, feature_acts: Tensor) -> Tensor:
        step = self._active
        if step is None or feature_acts is not step.feature_acts:
            return super().decode(feature_acts)
        weights = step.values.to(self.W_dec.dtype)
        if step.decoder_norm is not None:  # the k values over unit-norm decoder rows
            weights = weights / step.decoder_norm[step.latents]
        sae_out = F.embedding_bag(step.latents, self.W_dec, per_sample_weights=weights, mode="sum") + self.b_dec
        sae_out = self.hook_sae_recons(sae_out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    def calculate_topk_aux_loss(
        self, sae_in: Tensor, sae_out: Tensor, hidden_pre: Tensor, dead_neuron_mask: Tensor | None
    ) -> Tensor:
        """sae-lens's AuxK loss (the top k_aux dead latents reconstruct the live ones' residual),
        over the dead latents' columns only instead of all columns with the others at -inf."""
        if self._active is None:
            return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)
        if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)
        residual = (sae_in - sae_out).detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        dead = dead_neuron_mask.nonzero().squeeze(1)
        values, positions = hidden_pre.index_select(-1, dead).topk(min(k_aux, num_dead), dim=-1, sorted=False)
        # k_aux (d_in / 2) latents per row: a product over the dead latents' decoder rows was
        # cheaper than gathering k_aux rows per row (forward and backward at 6,734 dead of 9,216
        # latents, one thread: 99 against 143 ms, a one-off measurement)
        if self._active.decoder_norm is not None:
            values = values / self._active.decoder_norm[dead][positions]
        acts = torch.zeros(len(values), num_dead, dtype=values.dtype, device=values.device)
        recons = self.reshape_fn_out(acts.scatter(-1, positions, values) @ self.W_dec[dead], self.d_head)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    def _acts_post_hooked(self) -> bool:
        """Whether a hook reads the dense activations (then sae-lens's own step runs)."""
        hook = self.hook_sae_acts_post
        return bool(hook._forward_hooks) or bool(hook._backward_hooks)
