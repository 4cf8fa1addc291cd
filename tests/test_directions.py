"""srlib.directions on hand-made latent matrices whose answers are written out by hand."""

import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from srlib.directions import (
    Directions,
    activation_frequencies,
    rank_latents,
    select_directions,
    separation_scores,
)
from srlib.errors import ConfigError, DataError

# 4 chosen and 4 rejected samples over 8 latents; latents 6 and 7 never fire.
# A negative value is not a firing (eq. 6 counts f_j > 0).
LATENTS_W = torch.tensor(
    [
        [1.0, 0, 2, 0, 0, 0.5, 0, 0],
        [1.0, 0, 0, 0, 3, 0, 0, 0],
        [1.0, 1, 0, 0, 0, 0, 0, 0],
        [0.0, 0, 1, 0, 0, 0, 0, 0],
    ]
)
LATENTS_L = torch.tensor(
    [
        [0.0, 1, 0, 1, 0, 0, 0, 0],
        [0.0, 1, 0, 0, 1, 0, 0, 0],
        [1.0, 0, 0, 1, 0, 0, 0, 0],
        [0.0, 0, 1, 0, 0, -1, 0, 0],
    ]
)
# By hand: mu_w = [.75 .25 .5 0 .25 .25 0 0], mu_l = [.25 .5 .25 .5 .25 0 0 0]
# nabla = [.5 -.25 .25 -.5 0 .25 0 0]; delta = -nabla.
W_DEC = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)


def test_activation_frequencies_by_hand():
    assert activation_frequencies(LATENTS_W).tolist() == [0.75, 0.25, 0.5, 0, 0.25, 0.25, 0, 0]
    assert activation_frequencies(LATENTS_L).tolist() == [0.25, 0.5, 0.25, 0.5, 0.25, 0, 0, 0]


def test_separation_scores_by_hand():
    nabla, delta = separation_scores(activation_frequencies(LATENTS_W), activation_frequencies(LATENTS_L))
    assert nabla.tolist() == [0.5, -0.25, 0.25, -0.5, 0, 0.25, 0, 0]
    assert torch.equal(delta, -nabla)


def test_top_k_by_hand():
    d = select_directions(W_DEC, LATENTS_W, LATENTS_L, k=2)
    assert d.indices_w.tolist() == [0, 2]  # 0.5, then the 0.25 tie 2 vs 5 goes to index 2
    assert d.indices_l.tolist() == [3, 1]
    assert d.scores_w.tolist() == [0.5, 0.25]
    assert d.scores_l.tolist() == [0.5, 0.25]
    assert d.k == 2 and d.indices.tolist() == [0, 2, 3, 1]
    assert d.vectors.shape == (4, 3)


def test_ties_break_by_index_ascending():
    assert rank_latents(torch.tensor([0.0, 0.25, -0.0, 0.25, 0.0])).tolist() == [1, 3, 0, 2, 4]
    assert rank_latents(torch.zeros(6)).tolist() == [0, 1, 2, 3, 4, 5]
    d = select_directions(W_DEC, LATENTS_W, LATENTS_L, k=3)
    assert d.indices_w.tolist() == [0, 2, 5]


def test_decoder_rows_match_w_dec():
    d = select_directions(W_DEC, LATENTS_W, LATENTS_L, k=3)
    assert torch.equal(d.vectors, W_DEC[[0, 2, 5, 3, 1, 4]])
    assert torch.equal(d.F_w, W_DEC[[0, 2, 5]]) and torch.equal(d.F_l, W_DEC[[3, 1, 4]])
    assert not d.normalized


def test_accepts_an_sae_lens_sae():
    sae = TopKSAE(TopKSAEConfig(d_in=3, d_sae=8, k=2))
    with torch.no_grad():
        sae.W_dec.copy_(W_DEC)
    d = select_directions(sae, LATENTS_W, LATENTS_L, k=2)
    assert torch.equal(d.vectors, W_DEC[[0, 2, 3, 1]])
    assert not d.vectors.requires_grad


def test_normalize_option():
    d = select_directions(W_DEC, LATENTS_W, LATENTS_L, k=2, normalize=True)
    rows = W_DEC[[0, 2, 3, 1]]
    assert d.normalized
    torch.testing.assert_close(d.vectors.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(d.vectors, rows / rows.norm(dim=1, keepdim=True))


def test_overlap_option():
    # k=4: nabla ranks 0,2,5,4,6,7,... and delta ranks 3,1,4,6,7,... -> latent 4 on both sides.
    d = select_directions(W_DEC, LATENTS_W, LATENTS_L, k=4)
    assert d.indices_w.tolist() == [0, 2, 5, 4]
    assert d.indices_l.tolist() == [3, 1, 4, 6]
    d = select_directions(W_DEC, LATENTS_W, LATENTS_L, k=4, allow_overlap=False)
    assert d.indices_w.tolist() == [0, 2, 5, 4]
    assert d.indices_l.tolist() == [3, 1, 6, 7]
    assert d.scores_l.tolist() == [0.5, 0.25, 0.0, 0.0]


def test_k_out_of_range_is_one_line_config_error():
    with pytest.raises(ConfigError, match="k=9") as err:
        select_directions(W_DEC, LATENTS_W, LATENTS_L, k=9)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="2k"):
        select_directions(W_DEC, LATENTS_W, LATENTS_L, k=5, allow_overlap=False)
    with pytest.raises(ConfigError):
        select_directions(W_DEC, LATENTS_W, LATENTS_L, k=0)


def test_width_mismatch_and_empty_sets():
    with pytest.raises(ConfigError, match="8 latents"):
        select_directions(W_DEC, LATENTS_W[:, :6], LATENTS_L, k=2)
    with pytest.raises(DataError):
        activation_frequencies(torch.zeros(0, 8))


def test_directions_dataclass_is_what_select_returns():
    assert isinstance(select_directions(W_DEC, LATENTS_W, LATENTS_L, k=1), Directions)
