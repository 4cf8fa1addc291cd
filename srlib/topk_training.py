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

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE
from torch import Tensor


class GatherTopKTrainingSAE(TopKTrainingSAE):
    """`TopKTrainingSAE` whose `training_forward_pass` decodes by gather (see the module docstring).

    The step's `feature_acts` (used by sae-lens's trainer only to count which latents fired) is
    a sparse COO tensor without gradient, the form sae-lens's trainer accepts from its own
    sparse option; the gradients flow through the k values."""

    # set for the duration of one training step: the step's sparse feature_acts, values, latents
    _in_step: bool = False
    _active: tuple[Tensor, Tensor, Tensor] | None = None

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
        if self.cfg.rescale_acts_by_decoder_norm:
            # (x W_enc + b_enc) * norm, with the norm folded into the [d_in, d_sae] weights
            norm = self.W_dec.norm(dim=-1)
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
        self._active = (feature_acts, values, latents)
        return feature_acts, hidden_pre

    def decode(self, feature_acts: Tensor) -> Tensor:
        if self._active is None or feature_acts is not self._active[0]:
            return super().decode(feature_acts)
        _, values, latents = self._active
        sae_out = self._decode_rows(values, latents) + self.b_dec
        sae_out = self.hook_sae_recons(sae_out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    def calculate_topk_aux_loss(
        self, sae_in: Tensor, sae_out: Tensor, hidden_pre: Tensor, dead_neuron_mask: Tensor | None
    ) -> Tensor:
        """sae-lens's AuxK loss (the top k_aux dead latents reconstruct the live ones' residual),
        over the dead latents' columns only instead of all columns with the others at -inf."""
        if not self._in_step:
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
        # k_aux (d_in / 2) latents per row: a product over the dead latents' decoder rows is
        # cheaper here than gathering k_aux rows per row (`benchmarks/sae_step.py`)
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self.W_dec.norm(dim=-1)[dead][positions]
        acts = torch.zeros(len(values), num_dead, dtype=values.dtype, device=values.device)
        recons = self.reshape_fn_out(acts.scatter(-1, positions, values) @ self.W_dec[dead], self.d_head)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    def _decode_rows(self, values: Tensor, latents: Tensor) -> Tensor:
        """sum_j values[:, j] * W_dec[latents[:, j]] (each row over unit-norm decoder rows when
        the decoder norm rescales the activations), without a dense [rows, d_sae] tensor."""
        weights = values.to(self.W_dec.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            weights = weights / self.W_dec.norm(dim=-1)[latents]
        return F.embedding_bag(latents, self.W_dec, per_sample_weights=weights, mode="sum")

    def _acts_post_hooked(self) -> bool:
        """Whether a hook reads the dense activations (then sae-lens's own step runs)."""
        hook = self.hook_sae_acts_post
        return bool(hook._forward_hooks) or bool(hook._backward_hooks)
