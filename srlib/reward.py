"""Reward models read from hidden states: SparseRM (paper §3.2, eq. 10-13), its ablations, DenseRM.

A reward model here is two parts:

1. a fixed **feature map** from the hidden state z of the last token (``[n, d]``) to a
   feature vector: ``projection`` (the paper's v_p = [z·F_w | z·F_l], eq. 10-12), ``latents``
   (the SAE activations of the same selected latents, Table 2), ``random`` (projections on as
   many random unit directions, Table 2) or ``dense`` (z itself: DenseRM, §5.2);
2. a trained **reward head**, an MLP Linear(m, 512) → ReLU → Linear(512, 1) that maps the
   features to a scalar score, trained on preference pairs with the margin loss (eq. 13) or,
   for the ablation of Table 3, the Bradley-Terry or BCE loss.

What the paper leaves open, and the defaults chosen here (each is a parameter; the book
picks the final values on validation data). Every head setting below is a field of one frozen
`HeadConfig` (`srlib.reward_config`), the profile's default is `Profile.head`, and a fitted
model's whole description (feature kind, K, layer, SAE source, read position, head) is
`rm.rm_config`, a `SparseRMConfig`:

* Head: "a single-layer MLP with a hidden dimension of 512" is read as one hidden layer of
  512 units with ReLU, i.e. 2K·512 + 512 + 512 + 1 = 132,097 trainable numbers for K = 128.
* Feature scaling (``standardize=True``): each feature is standardised with the mean and
  standard deviation of the training features of chosen AND rejected responses; the
  statistics live in the head as buffers, so they are applied inside ``forward`` and saved
  with it. A constant feature (std ≤ 1e-6) keeps scale 1. Chapter 3's validation study
  compares it with raw inputs (`srlib.experiments.validation_study`). With standardisation on, decoder-row normalisation
  (`select_directions(normalize=...)`, default False as in the paper) cannot change the model: scaling
  a direction scales its projection and its std alike.
* γ (``gamma=1.0``): with standardised inputs the scores are O(1); for a ReLU head γ only
  sets the scale of the scores (a positively homogeneous network with γ is the same network,
  rescaled, with γ = 1), so 1.0 is the natural unit.
* Optimiser: Adam, lr 1e-3, no weight decay, minibatches of 64 pairs, up to 50 epochs with
  early stopping on validation pair accuracy (patience 10); the state of the best epoch is
  kept. Without a validation set nothing is held out: all ``epochs`` run and the last state is
  kept (use the best epoch of a run with validation as ``epochs`` then).
* Ties: a pair counts as correct only when s_w > s_l strictly.

Saved format (``save_pretrained(dir)``): ``dir/config.json`` (what the model is and how it
was trained: format 2 keeps ``rm_config.to_dict()`` under ``"config"``; folders of format 1,
written before `SparseRMConfig`, still load: `saved_rm_config`) and ``dir/model.safetensors`` (``head.*`` weights and
standardisation, ``features.*`` tensors: for ``projection`` and ``random`` the [2K, d] direction matrix, so
scoring needs no SAE). The ``latents`` map needs the whole SAE encoder (a TopK SAE picks its
active latents among all of them), so it also writes ``dir/sae/`` in sae-lens format. A model
card ``dir/README.md`` (`srlib.hub.model_card`) describes it for the Hugging Face Hub, where
``push_to_hub`` uploads the folder and ``from_pretrained`` reads a repo id like a folder.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import srlib
from srlib.cache import read_json, read_tensors
from srlib.errors import ConfigError, DamagedFileError, SrlibError, one_line
from srlib.paths import atomic_path
from srlib.progress import progress_bar
from srlib.reward_config import ACTIVATION_NAMES, LOSS_NAMES, HeadConfig, SparseRMConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAE_DIR_NAME = "sae"
FORMAT_NAME = "srlib-reward-model"
#: 2: what the model is and how its head was trained sit under "config" (`SparseRMConfig.to_dict`);
#: 1 (read too): the same values as top-level keys and the history's settings.
FORMAT_VERSION = 2
STD_EPS = 1e-6


# ----------------------------------------------------------------------------- checks


def _as_states(Z: Tensor, name: str, d: int | None = None) -> Tensor:
    """Check that Z is a 2-D [n, d] tensor (of width d if given) and return it as float32 CPU."""
    if not isinstance(Z, Tensor) or Z.ndim != 2:
        shape = tuple(Z.shape) if isinstance(Z, Tensor) else type(Z).__name__
        raise ConfigError(f"{name} must be a 2-D [n, d] tensor, got {shape}")
    if d is not None and Z.shape[1] != d:
        raise ConfigError(f"{name} has width {Z.shape[1]} but {d} was expected")
    return Z.detach().to(device="cpu", dtype=torch.float32)


def _check_pair_tensors(A: Tensor, B: Tensor, what: str, d: int | None = None) -> tuple[Tensor, Tensor]:
    """Check a chosen/rejected pair of [n, d] tensors: same shape, n > 0, finite."""
    A = _as_states(A, f"{what} chosen", d)
    B = _as_states(B, f"{what} rejected", d)
    if A.shape != B.shape:
        raise ConfigError(f"{what} chosen {tuple(A.shape)} and rejected {tuple(B.shape)} differ in shape")
    if A.shape[0] == 0:
        raise ConfigError(f"the {what} set is empty")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ConfigError(f"the {what} set contains NaN or infinite values")
    return A, B


def _sae_dims(sae) -> tuple[int, int]:
    """(d_in, d_sae) of an sae-lens SAE."""
    return int(sae.cfg.d_in), int(sae.cfg.d_sae)


def _check_sae(sae, d: int, k: int | None = None) -> None:
    """The SAE must read vectors of width d and (if k is given) have at least k latents."""
    d_in, d_sae = _sae_dims(sae)
    if d_in != d:
        raise ConfigError(f"the SAE reads vectors of width {d_in} but the hidden size is {d}")
    if k is not None and not 1 <= k <= d_sae:
        raise ConfigError(f"k={k} is out of range: the SAE has {d_sae} latents")


# ----------------------------------------------------------------------------- feature maps


class FeatureMap:
    """A fixed map from hidden states Z [n, in_dim] to reward-head features [n, out_dim].

    Subclasses set `kind`, implement `__call__`, `config` and (if they hold tensors)
    `state_dict`; `from_state` rebuilds one from its `config()` and `state_dict()`.
    """

    kind: ClassVar[str]
    in_dim: int
    out_dim: int

    def __call__(self, Z: Tensor) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able description (kind, widths, and what else rebuilding needs)."""
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim}

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors that define the map (saved in model.safetensors under `features.`)."""
        return {}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, Tensor], sae=None) -> FeatureMap:
        raise NotImplementedError


class ProjectionFeatures(FeatureMap):
    """Eq. 10-12: v_p = Z @ vectors.T, i.e. [z·F_w | z·F_l] for vectors = [F_w ; F_l] ([2K, d])."""

    kind = "projection"

    def __init__(self, vectors: Tensor):
        # A fresh, contiguous copy: a matrix read from a file may sit at an address that sends
        # the product down another kernel, and a loaded model would score in other last bits.
        self.vectors = _as_states(vectors, "the direction matrix").contiguous().clone()
        self.out_dim, self.in_dim = self.vectors.shape

    def __call__(self, Z: Tensor) -> Tensor:
        return _as_states(Z, "hidden states", self.in_dim) @ self.vectors.T

    def state_dict(self) -> dict[str, Tensor]:
        return {"vectors": self.vectors}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, Tensor], sae=None) -> ProjectionFeatures:
        return cls(tensors["vectors"])


def random_unit_vectors(d: int, m: int, seed: int = 0) -> Tensor:
    """m directions drawn uniformly on the unit sphere of R^d (Gaussian rows, normalised)."""
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(m, d, generator=generator)
    return vectors / vectors.norm(dim=1, keepdim=True)


class RandomFeatures(ProjectionFeatures):
    """Table 2's control: projections on m random unit directions instead of the SAE's."""

    kind = "random"

    def __init__(self, d: int, m: int, seed: int = 0):
        if d < 1 or m < 1:
            raise ConfigError(f"random features need d >= 1 and m >= 1, got d={d}, m={m}")
        super().__init__(random_unit_vectors(d, m, seed))
        self.seed = seed

    def config(self) -> dict[str, Any]:
        return {**super().config(), "seed": self.seed}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, Tensor], sae=None) -> RandomFeatures:
        features = cls(config["in_dim"], config["out_dim"], config["seed"])
        features.vectors = tensors["vectors"].float()  # saved, so a new torch RNG cannot change them
        return features


class LatentFeatures(FeatureMap):
    """Table 2's ablation: the SAE activations of the selected latents, encode(sae, Z)[:, indices]."""

    kind = "latents"

    def __init__(self, sae, indices: Tensor | Sequence[int]):
        self.sae = sae
        self.in_dim, d_sae = _sae_dims(sae)
        self.indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        if self.indices.numel() == 0:
            raise ConfigError("latent features need at least one latent index")
        if self.indices.min() < 0 or self.indices.max() >= d_sae:
            raise ConfigError(f"a latent index is out of range: the SAE has {d_sae} latents")
        self.out_dim = int(self.indices.numel())

    def __call__(self, Z: Tensor) -> Tensor:
        from srlib.sae import encode

        return encode(self.sae, _as_states(Z, "hidden states", self.in_dim))[:, self.indices].float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"indices": self.indices}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, Tensor], sae=None) -> LatentFeatures:
        if sae is None:
            raise ConfigError("latent features need their SAE to be rebuilt")
        return cls(sae, tensors["indices"])


class DenseFeatures(FeatureMap):
    """DenseRM (§5.2): the hidden state itself, z -> z (width d)."""

    kind = "dense"

    def __init__(self, d: int):
        if d < 1:
            raise ConfigError(f"dense features need d >= 1, got {d}")
        self.in_dim = self.out_dim = d

    def __call__(self, Z: Tensor) -> Tensor:
        return _as_states(Z, "hidden states", self.in_dim)

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, Tensor], sae=None) -> DenseFeatures:
        return cls(config["in_dim"])


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    cls.kind: cls for cls in (ProjectionFeatures, LatentFeatures, RandomFeatures, DenseFeatures)
}


def make_features(kind: str, *, directions=None, sae=None, d: int | None = None, seed: int = 0) -> FeatureMap:
    """Build a feature map by name.

    projection: needs `directions` (a `srlib.directions.Directions`, uses `.vectors`);
    latents: needs `directions` (uses `.indices`) and the `sae`;
    random: 2K random unit directions (K from `directions`, width from `directions` or `d`), `seed`;
    dense: needs `d` (the hidden size).
    """
    if kind not in FEATURE_MAPS:
        raise ConfigError(f"unknown feature kind {kind!r}; choose one of: {', '.join(FEATURE_MAPS)}")
    if kind == "dense":
        if d is None:
            raise ConfigError("dense features need the hidden size d")
        return DenseFeatures(d)
    if directions is None:
        raise ConfigError(f"{kind} features need the selected directions")
    if kind == "projection":
        return ProjectionFeatures(directions.vectors)
    if kind == "random":
        width = int(directions.vectors.shape[1]) if d is None else d
        return RandomFeatures(width, int(directions.indices.numel()), seed)
    if sae is None:
        raise ConfigError("latent features need the SAE")
    return LatentFeatures(sae, directions.indices)


# ----------------------------------------------------------------------------- head and losses


#: The head's activations by the names `HeadConfig.activation` allows (`ACTIVATION_NAMES`, one list).
ACTIVATIONS: dict[str, type[nn.Module]] = dict(zip(ACTIVATION_NAMES, (nn.ReLU, nn.GELU, nn.Tanh), strict=True))


class RewardHead(nn.Module):
    """The reward head: standardise → Linear(in_dim, hidden) → activation → Linear(hidden, 1).

    The paper's "single-layer MLP with a hidden dimension of 512". The feature standardisation
    (buffers `mean`, `std`; identity until `set_standardization` is called) is part of the
    module, so it is applied in `forward` and saved with the weights. It is not trained.
    """

    mean: Tensor  # the buffers (registered in __init__), typed for the checker
    std: Tensor

    def __init__(self, in_dim: int, hidden: int = 512, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
        if in_dim < 1 or hidden < 1:
            raise ConfigError(f"the reward head needs in_dim >= 1 and hidden >= 1, got {in_dim}, {hidden}")
        self.in_dim, self.hidden, self.activation = in_dim, hidden, activation
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, 1))
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def set_standardization(self, X: Tensor) -> None:
        """Store the per-feature mean and std of X (rows: chosen and rejected training features)."""
        std = X.std(dim=0, unbiased=False)
        self.mean.copy_(X.mean(dim=0))
        self.std.copy_(torch.where(std > STD_EPS, std, torch.ones_like(std)))

    def forward(self, x: Tensor) -> Tensor:
        """Scores [n] for features x [n, in_dim]."""
        return self.net((x - self.mean) / self.std).squeeze(-1)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def config(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "hidden": self.hidden, "activation": self.activation}


def margin_loss(s_w: Tensor, s_l: Tensor, gamma: float = 1.0) -> Tensor:
    """Eq. 13: mean over pairs of max(0, γ − (s_w − s_l))."""
    return torch.clamp(gamma - (s_w - s_l), min=0).mean()


def bt_loss(s_w: Tensor, s_l: Tensor) -> Tensor:
    """Bradley-Terry: mean over pairs of −log σ(s_w − s_l)."""
    return -F.logsigmoid(s_w - s_l).mean()


def bce_loss(s_w: Tensor, s_l: Tensor) -> Tensor:
    """BCE on single scores as logits: every chosen response labelled 1, every rejected 0.

    Unlike the two pairwise losses it depends on the absolute scores, not only on s_w − s_l.
    """
    logits = torch.cat([s_w, s_l])
    labels = torch.cat([torch.ones_like(s_w), torch.zeros_like(s_l)])
    return F.binary_cross_entropy_with_logits(logits, labels)


#: The losses by the names `HeadConfig.loss` allows (`LOSS_NAMES`, one list).
LOSSES: dict[str, Callable[..., Tensor]] = dict(zip(LOSS_NAMES, (margin_loss, bt_loss, bce_loss), strict=True))


def get_loss(name: str, *, gamma: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss `name` as a function of (s_w, s_l); γ is used by the margin loss only."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    if name == "margin":
        if not gamma > 0:
            raise ConfigError(f"the margin gamma must be > 0, got {gamma}")
        return lambda s_w, s_l: margin_loss(s_w, s_l, gamma)
    return LOSSES[name]


def pair_accuracy(s_w: Tensor, s_l: Tensor) -> float:
    """Fraction of pairs with s_w > s_l. A tie counts as wrong (a constant model scores 0, not 0.5).

    The book's method comparisons count a tie as 1/2 instead (`srlib.evaluate.pair_outcomes`,
    `compare_paired`) and report the tie share beside every accuracy where it is non-zero.
    """
    if s_w.shape != s_l.shape or s_w.numel() == 0:
        raise ConfigError(
            f"pair_accuracy needs two non-empty score tensors of one shape, got "
            f"{tuple(s_w.shape)} and {tuple(s_l.shape)}"
        )
    return (s_w > s_l).float().mean().item()


# ----------------------------------------------------------------------------- training


@dataclass
class FitHistory:
    """What `fit_head` did: per-epoch curves, the epoch whose state was kept, and the settings.

    `best_epoch` is 1-based; without a validation set it is the last epoch run.
    """

    settings: dict[str, Any]
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)

    @property
    def best_val_accuracy(self) -> float | None:
        return self.val_accuracy[self.best_epoch - 1] if self.val_accuracy else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epochs_run": self.epochs_run, "best_val_accuracy": self.best_val_accuracy}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitHistory:
        keys = ("settings", "train_loss", "val_accuracy", "val_loss", "best_epoch", "stopped_early")
        return cls(**{key: data[key] for key in keys})

    def head_config(self) -> HeadConfig:
        """The `HeadConfig` the head was fitted with (`settings` less the optimiser's name)."""
        return HeadConfig(**{key: value for key, value in self.settings.items() if key != "optimizer"})


def _seeded_head(in_dim: int, hidden: int, activation: str, seed: int) -> RewardHead:
    """A RewardHead whose initial weights depend only on `seed` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RewardHead(in_dim, hidden, activation)


def fit_head(
    X_w: Tensor,
    X_l: Tensor,
    Xv_w: Tensor | None = None,
    Xv_l: Tensor | None = None,
    config: HeadConfig = HeadConfig(),
    *,
    progress: bool = False,
) -> tuple[RewardHead, FitHistory]:
    """Train a RewardHead on features of preference pairs (row i of X_w is preferred to row i of X_l),
    with the settings of `config` (a `HeadConfig`, validated when it was built).

    Adam on shuffled minibatches of pairs. With a validation set (Xv_w, Xv_l), the pair
    accuracy is measured after every epoch (ties broken by the lower validation loss); training
    stops after `config.patience` epochs without improvement and the best epoch's state is
    returned. Without one, all `config.epochs` run and the last state is returned. Deterministic
    given `config.seed` (initial weights and the order of the minibatches).
    """
    if not isinstance(config, HeadConfig):
        raise ConfigError(
            f"fit_head takes a HeadConfig, got {type(config).__name__}; build one with "
            "srlib.reward.HeadConfig(loss=..., epochs=...)"
        )
    X_w, X_l = _check_pair_tensors(X_w, X_l, "training")
    if (Xv_w is None) != (Xv_l is None):
        raise ConfigError("give both validation tensors (chosen and rejected) or neither")
    val = None
    if Xv_w is not None and Xv_l is not None:
        val = _check_pair_tensors(Xv_w, Xv_l, "validation", X_w.shape[1])
    loss_fn = get_loss(config.loss, gamma=config.gamma)

    history = FitHistory(settings={**asdict(config), "optimizer": "adam"})
    head = _seeded_head(X_w.shape[1], config.hidden, config.activation, config.seed)
    if config.standardize:
        head.set_standardization(torch.cat([X_w, X_l]))
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    generator = torch.Generator().manual_seed(config.seed)
    n = X_w.shape[0]
    best_key, best_state, waited = None, None, 0

    bar = progress_bar(range(1, config.epochs + 1), desc="reward head", unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        total = 0.0
        for batch in torch.randperm(n, generator=generator).split(config.batch_size):
            # both sides in one forward, and torch's fused Adam: the same step, a fit about a
            # quarter faster on a CPU than two forwards and the per-tensor Adam (timed once: 600
            # pairs, 256 inputs, one thread; benchmarks/rm_cost.py prints the fit times)
            scores = head(torch.cat([X_w[batch], X_l[batch]]))
            batch_loss = loss_fn(scores[: len(batch)], scores[len(batch) :])
            optimizer.zero_grad()
            batch_loss.backward()
            optimizer.step()
            total += batch_loss.item() * len(batch)
        history.train_loss.append(total / n)
        if val is None:
            continue
        head.eval()
        with torch.no_grad():
            sv_w, sv_l = head(val[0]), head(val[1])
        accuracy, val_loss = pair_accuracy(sv_w, sv_l), loss_fn(sv_w, sv_l).item()
        history.val_accuracy.append(accuracy)
        history.val_loss.append(val_loss)
        bar.set_postfix(loss=f"{total / n:.4f}", val_acc=f"{accuracy:.3f}")
        if best_key is None or (accuracy, -val_loss) > best_key:
            best_key, best_state, waited = (accuracy, -val_loss), copy.deepcopy(head.state_dict()), 0
            history.best_epoch = epoch
        else:
            waited += 1
            if waited >= config.patience:
                history.stopped_early = True
                break
    if best_state is not None:  # with validation pairs: the best epoch's state
        head.load_state_dict(best_state)
    else:
        history.best_epoch = history.epochs_run
    head.eval()
    return head, history


# ----------------------------------------------------------------------------- reward models


_RM = TypeVar("_RM", bound="RewardModel")
_FeatureRM = TypeVar("_FeatureRM", bound="FeatureRM")


class Fitted(NamedTuple):
    """The parts of a fitted `FeatureRM` (`FeatureRM.require_fitted`): never None."""

    features: FeatureMap
    head: RewardHead
    history: FitHistory


class RewardModel:
    """What every reward model offers: scores for texts and pairs, save/load, a parameter count.

    A subclass implements `score`, `score_pairs`, `num_trainable_parameters`,
    `save_pretrained` (writing `config.json` that starts with `self._config_header()`) and
    the classmethod `_load(directory, config, backbone)`. `RewardModel.from_pretrained` finds
    the subclass through `rm_class` (srlib's own classes only: see `RM_CLASSES`).
    """

    def score(self, texts: list[str]) -> Tensor:
        """Scores [n] for chat-formatted prompt+response texts (`srlib.backbone.format_text`)."""
        raise NotImplementedError

    def score_pairs(self, pairs, *, progress: bool = False) -> tuple[Tensor, Tensor]:
        """(s_chosen, s_rejected), 1-D float32, for a list of `PreferencePair`s (`progress`: a bar)."""
        raise NotImplementedError

    def num_trainable_parameters(self) -> int:
        raise NotImplementedError

    def as_reward_function(self, *, name: str | None = None, **score_kwargs) -> RewardFunction:
        """This model as a TRL reward function, for `GRPOTrainer(reward_funcs=...)` (`RewardFunction`).

        `score_kwargs` go to `score` on every call (e.g. `batch_size`)."""
        return RewardFunction(self, name=name, **score_kwargs)

    def as_pairwise_judge(self, **score_kwargs) -> PairwiseJudge:
        """This model as a pairwise judge with the interface of TRL's judges (`PairwiseJudge`)."""
        return PairwiseJudge(self.as_reward_function(**score_kwargs))

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> None:
        """Save to `directory`, atomically; an existing saved reward model there is replaced only
        with `overwrite`, and a folder holding anything else is refused (`srlib.paths.check_output`)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The JSON description `save_pretrained` writes as config.json, starting with
        `_config_header()`."""
        raise NotImplementedError

    def _config_header(self) -> dict[str, Any]:
        cls = type(self)
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "srlib_version": srlib.__version__,
            "rm_class": cls.__name__,
        }

    @classmethod
    def _load(cls: type[_RM], directory: Path, config: dict, backbone=None) -> _RM:
        raise NotImplementedError

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload this model to the Hugging Face Hub repo `repo_id` (created if missing), as
        huggingface_hub's `ModelHubMixin.push_to_hub`; see `srlib.hub.push_to_hub` for the options."""
        from srlib.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls: type[_RM],
        pretrained_model_name_or_path: str | Path,
        *,
        backbone=None,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> _RM:
        """Load a saved reward model of whatever srlib class saved it; optionally attach a backbone now.

        A local folder, or a Hugging Face Hub repo id ("owner/name", with huggingface_hub's
        `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`): the repo's
        snapshot is fetched (`srlib.hub.download`, srlib's own files only) and read like a
        local folder. Nothing in the folder is run: the class comes from srlib's fixed table
        `RM_CLASSES`, the weights from safetensors. A damaged folder raises a one-line
        `DamagedFileError` naming the file.
        """
        from srlib.hub import download

        directory = download(
            pretrained_model_name_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise SrlibError(f"{directory} is not a saved reward model: {CONFIG_NAME} missing")
        config = read_json(path, damaged_remedy(directory))
        if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
            raise SrlibError(f"{directory} is not a saved reward model: {path} is not an srlib reward model config")
        version = config.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise DamagedFileError(
                f"{path}: format_version {version!r} is not a version number; {damaged_remedy(directory)}"
            )
        if version > FORMAT_VERSION:
            raise SrlibError(f"{directory} was saved by a newer srlib (format {version}); upgrade srlib")
        model_cls = rm_class(config.get("rm_class"), where=str(path))
        if not issubclass(model_cls, cls):
            raise SrlibError(f"{directory} holds a {model_cls.__name__}, not a {cls.__name__}")
        try:
            return model_cls._load(directory, config, backbone)
        except KeyError as error:
            raise DamagedFileError(f"{path}: missing entry {error}; {damaged_remedy(directory)}") from None
        except (TypeError, AttributeError) as error:
            raise DamagedFileError(
                f"{path}: malformed entry ({one_line(str(error))}); {damaged_remedy(directory)}"
            ) from None


#: srlib's reward-model classes by the name `config.json` stores, with the srlib module that
#: defines each. A saved folder can name only these: no module a file names is ever imported.
RM_CLASSES: dict[str, str] = {
    "SparseRM": "srlib.reward",
    "DenseRM": "srlib.reward",
    "FeatureRM": "srlib.reward",
    "StandardRM": "srlib.baselines",
    "GeneralizableRM": "srlib.baselines",
    "GenerativeJudge": "srlib.baselines",
    "LogProbPreference": "srlib.baselines",
    "SteeredSparseRM": "srlib.explain",
}


def rm_class(name: Any, *, where: str = "the config") -> type[RewardModel]:
    """srlib's reward-model class called `name`, its module imported from the fixed table
    `RM_CLASSES`; any other name is refused with one line."""
    if not isinstance(name, str) or name not in RM_CLASSES:
        raise SrlibError(
            f"{where}: {name!r} is not one of srlib's reward model classes "
            f"({', '.join(RM_CLASSES)}); srlib loads only its own classes and runs no code from a folder"
        )
    return getattr(importlib.import_module(RM_CLASSES[name]), name)


def saved_rm_config(config: dict[str, Any], path: str | Path) -> SparseRMConfig:
    """The `SparseRMConfig` in a feature reward model's config.json (`path` names it in errors).

    Format 2 stores it under "config"; format 1 (folders saved before `SparseRMConfig`) had its
    values as top-level keys and the head's settings in the history, read here the same way.
    """
    if config.get("format_version", 0) >= 2:
        return SparseRMConfig.from_dict(config["config"], source=str(path))
    settings = {key: value for key, value in config["history"]["settings"].items() if key != "optimizer"}
    try:
        return SparseRMConfig(
            features=config["feature_kind"],
            k=config["k"],
            layer=config["layer"],
            sae_source=(config["sae"] or {}).get("source"),
            position=config.get("position", "last"),  # saved before read positions: the last token
            max_length=config["max_length"],
            head=HeadConfig(**settings),
        )
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def damaged_remedy(directory: str | Path) -> str:
    """What to do about a damaged reward-model folder (the end of its one-line error)."""
    return (
        f"the reward model in {directory} is damaged or incomplete: save it again (python -m srlib fit ... --out DIR)"
    )


def is_saved_reward_model(directory: str | Path) -> bool:
    """True when `directory/config.json` opens with srlib's reward-model header, even if the rest
    is damaged: the only folders `save_pretrained` may replace (anything else may be a user's data)."""
    try:
        with open(Path(directory) / CONFIG_NAME, encoding="utf-8", errors="replace") as handle:
            head = handle.read(300)
    except OSError:
        return False
    return json.dumps({"format": FORMAT_NAME})[1:-1] in head


# ----------------------------------------------------------------------------- TRL adapters


class RewardFunction:
    """A reward model as TRL's reward function: `f(prompts, completions, **kwargs) -> list[float]`.

    TRL's online trainers (`GRPOTrainer(reward_funcs=...)`, RLOO, online DPO) call it with a
    batch of prompts and their completions, in either of TRL's formats: standard (strings: the
    prompt is the user's turn, the completion the assistant's answer) or conversational
    (lists of `{"role", "content"}` messages: the prompt's turns, and the completion's
    assistant turn). Each pair goes through the backbone's chat template
    (`srlib.backbone.format_text`), the text a reward model's training pairs became, and is
    scored by `model.score`; the other arguments TRL passes (completion_ids, trainer_state,
    the data set's columns) are not read. TRL names a reward function by `__name__`, the
    reward model's class unless `name` is given: its logs say `rewards/<name>/mean`.
    """

    def __init__(self, model: RewardModel, *, name: str | None = None, **score_kwargs):
        self.model = model
        self.__name__ = name or type(model).__name__
        self.score_kwargs = score_kwargs

    def texts(self, prompts: Sequence, completions: Sequence) -> list[str]:
        """The chat-formatted prompt+completion texts the model scores."""
        from srlib.backbone import format_text

        if len(prompts) != len(completions):
            raise ConfigError(
                f"{len(prompts)} prompts but {len(completions)} completions: give one prompt per completion"
            )
        backbone = getattr(self.model, "backbone", None)
        if backbone is None:
            raise ConfigError(
                f"a {type(self.model).__name__} has no backbone whose tokenizer formats the texts it scores"
            )
        tokenizer = backbone.tokenizer
        return [
            format_text(tokenizer, prompt if isinstance(prompt, str) else tuple(prompt), _answer(completion))
            for prompt, completion in zip(prompts, completions, strict=True)
        ]

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        """One reward per completion, in order."""
        return [float(s) for s in self.model.score(self.texts(prompts, completions), **self.score_kwargs)]


def _answer(completion) -> str:
    """The assistant's answer of a completion: the string itself, or the content of a
    conversational completion's assistant message(s)."""
    if isinstance(completion, str):
        return completion
    parts = [m.get("content") for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
    texts = [p for p in parts if isinstance(p, str)]
    if not parts or len(texts) != len(parts):
        raise ConfigError(
            f"a completion must be a string or a list of messages with an assistant turn of text, "
            f"got {one_line(repr(completion), 80)}"
        )
    return "".join(texts)


class PairwiseJudge:
    """A reward model as a pairwise judge, with the interface of TRL's judges.

    `judge(prompts, completions, shuffle_order=True, return_scores=False)` follows TRL's
    `BasePairwiseJudge.judge` (trl 1.16 no longer ships the judges, so this class stands alone
    with the same signature): `completions[i]` holds two answers to `prompts[i]` (strings or
    conversational completions); the result is the index, 0 or 1, of the answer the reward model
    scores higher, or with `return_scores` the probability that the first is better,
    sigmoid(s_0 - s_1) (the Bradley-Terry reading of a score gap; 0.5 on a tie). A tie picks
    the first answer (index 0). `shuffle_order` is accepted and has no effect: each answer is
    scored alone, so the order of the two cannot bias the verdict as it can an LLM judge's.
    """

    def __init__(self, reward_function: RewardFunction):
        self.reward_function = reward_function

    def judge(
        self,
        prompts: Sequence,
        completions: Sequence[Sequence],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int] | list[float]:
        """For each prompt, which of its two completions is better (or how likely the first is)."""
        if len(prompts) != len(completions) or any(len(pair) != 2 for pair in completions):
            raise ConfigError("a pairwise judge needs one prompt per pair of exactly two completions")
        firsts = self.reward_function(prompts, [pair[0] for pair in completions])
        seconds = self.reward_function(prompts, [pair[1] for pair in completions])
        if return_scores:
            gap = torch.tensor(firsts, dtype=torch.float64) - torch.tensor(seconds, dtype=torch.float64)
            return torch.sigmoid(gap).tolist()
        return [0 if a >= b else 1 for a, b in zip(firsts, seconds, strict=True)]


class FeatureRM(RewardModel):
    """A reward model = a fixed feature map on hidden states + a trained `RewardHead`.

    `SparseRM` (projection on SAE directions, and its `latents` / `random` ablations) and
    `DenseRM` are its two named forms; all the logic lives here.

    Metadata: `layer`, `max_length` and `position` (the token read, `srlib.activations.POSITIONS`)
    say which hidden states the model reads (needed by `score`, `score_pairs`); `sae_info` records the SAE the
    directions came from (source, widths, architecture). `rm_config` gathers them with the head's `HeadConfig`
    (a `SparseRMConfig`).

    A saved model is rebuilt through this constructor (`_load`): `head` and `history` (a fitted
    head), `k`, `latent_indices` ({"w": [...], "l": [...]}), `directions_normalized` and
    `backbone_record` ({"model_id", "identity", "weights"} and "autocast" when set: the backbone it
    was fitted on) are what config.json records besides the feature map.
    """

    #: The `SparseRMConfig.features` a subclass's `fit` builds.
    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        features: FeatureMap | None,
        *,
        backbone=None,
        layer: int | None = None,
        max_length: int = 512,
        sae_info: dict[str, Any] | None = None,
        position: str = "last",
        head: RewardHead | None = None,
        history: FitHistory | None = None,
        k: int | None = None,
        latent_indices: dict[str, list[int]] | None = None,
        directions_normalized: bool | None = None,
        backbone_record: dict[str, Any] | None = None,
    ):
        self.features = features
        self.head: RewardHead | None = None if head is None else head.eval()
        self.history: FitHistory | None = history
        self.layer = layer
        self.max_length = max_length
        self.position = position
        self.sae_info = sae_info
        self.sae = getattr(features, "sae", None)
        self.directions = None
        self.k: int | None = k
        self.indices_w: list[int] | None = None if latent_indices is None else list(latent_indices["w"])
        self.indices_l: list[int] | None = None if latent_indices is None else list(latent_indices["l"])
        self.directions_normalized: bool | None = directions_normalized
        from srlib.backbone import backbone_record as record_of  # here: transformers loads on first use

        record = backbone_record or {}
        #: The backbone it was (or will be) fitted on, as config.json's "backbone" entry
        #: (`srlib.backbone.backbone_record`: model id, identity, weights, autocast).
        self.backbone_record: dict[str, Any] = record_of(
            record.get("model_id"), record.get("identity"), record.get("weights"), record.get("autocast")
        )
        self._backbone = None
        if backbone is not None:
            self.attach_backbone(backbone)

    # -- backbone -------------------------------------------------------------------------

    def attach_backbone(self: _FeatureRM, backbone, *, strict: bool = True) -> _FeatureRM:
        """Use `backbone` to extract hidden states. Its hidden size must match the feature map;
        with `strict`, its identity must match the one the model was fitted on (if recorded)."""
        if self.features is not None and backbone.hidden_size != self.features.in_dim:
            raise ConfigError(
                f"the backbone's hidden size is {backbone.hidden_size} but the reward "
                f"model reads vectors of width {self.features.in_dim}"
            )
        fitted_on = self.backbone_record["identity"]
        if strict and fitted_on and backbone.identity != fitted_on:
            raise ConfigError(
                f"backbone {backbone.model_id!r} is not the one this reward model was fitted on "
                f"(identity {backbone.identity!r} != {fitted_on!r}); pass strict=False to force"
            )
        self._backbone = backbone
        self.backbone_record = backbone.record
        return self

    @property
    def backbone(self):
        """The attached backbone; loaded from the recorded model id on first use if none is attached."""
        if self._backbone is None:
            from srlib.backbone import load_recorded_backbone

            self.attach_backbone(load_recorded_backbone(self.backbone_record))
        return self._backbone

    # -- fitting ----------------------------------------------------------------------------

    def _prepare_features(self, d: int) -> FeatureMap:
        """The feature map for hidden states of width d (checks the width)."""
        if self.features is None:
            raise ConfigError(f"{type(self).__name__} has no feature map")
        if self.features.in_dim != d:
            raise ConfigError(
                f"the hidden states have width {d} but the feature map reads width {self.features.in_dim}"
            )
        return self.features

    def fit_states(
        self: _FeatureRM,
        Z_w: Tensor,
        Z_l: Tensor,
        Zv_w: Tensor | None = None,
        Zv_l: Tensor | None = None,
        *,
        head: HeadConfig = HeadConfig(),
        progress: bool = False,
    ) -> _FeatureRM:
        """Fit the head on already-extracted hidden states [n, d] of chosen/rejected responses,
        with the settings of `head` (`fit_head`). Returns self.
        """
        Z_w, Z_l = _check_pair_tensors(Z_w, Z_l, "training")
        features = self._prepare_features(Z_w.shape[1])
        if (Zv_w is None) != (Zv_l is None):
            raise ConfigError("give both validation tensors (chosen and rejected) or neither")
        Xv_w, Xv_l = (features(Zv_w), features(Zv_l)) if Zv_w is not None and Zv_l is not None else (None, None)
        self.head, self.history = fit_head(features(Z_w), features(Z_l), Xv_w, Xv_l, head, progress=progress)
        return self

    @classmethod
    def _check_fit_config(cls, config: Any) -> SparseRMConfig:
        """`config` if `fit` can build it: a `SparseRMConfig` of one of this class's `kinds`, with
        a layer; a one-line `ConfigError` otherwise (before any state is extracted)."""
        name = cls.__name__
        if not isinstance(config, SparseRMConfig):
            raise ConfigError(
                f"{name}.fit takes config=SparseRMConfig(...), got {type(config).__name__}; "
                "build it with srlib.profiles.Profile.sparserm_config or SparseRMConfig(...)"
            )
        if config.features not in cls.kinds:
            other = "DenseRM" if config.features == "dense" else "SparseRM"
            raise ConfigError(f"{name}.fit cannot fit features={config.features!r}; use {other}.fit")
        if config.layer is None:
            raise ConfigError(f"{name}.fit needs config.layer, the hidden layer to read; set SparseRMConfig(layer=...)")
        return config

    @classmethod
    def _fit_states(
        cls, backbone, train_pairs, val_pairs, config: SparseRMConfig, **extract
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | tuple[None, None]]:
        """(Z_w, Z_l, (Zv_w, Zv_l)): the hidden states of the training and validation pairs as
        `config` reads them (layer, position, max_length); (None, None) without validation pairs."""
        layer = config.layer
        assert layer is not None  # `_check_fit_config` refused a config without one
        read = dict(max_length=config.max_length, position=config.position, **extract)
        Z_w, Z_l = cls._pair_states(backbone, train_pairs, layer, "training", **read)
        val = cls._pair_states(backbone, val_pairs, layer, "validation", **read) if val_pairs else (None, None)
        return Z_w, Z_l, val

    @classmethod
    def _pair_states(cls, backbone, pairs, layer: int, what: str, **extract) -> tuple[Tensor, Tensor]:
        """Hidden states of the chosen and rejected responses of `pairs` (non-empty)."""
        if not pairs:
            raise ConfigError(f"the {what} set is empty")
        from srlib.activations import pair_states

        return pair_states(backbone, pairs, layer, **extract)

    # -- scoring ------------------------------------------------------------------------------

    def require_fitted(self) -> Fitted:
        """The feature map, head and fit history; a one-line `ConfigError` if the model is not fitted."""
        if self.features is None or self.head is None or self.history is None:
            raise ConfigError(f"this {type(self).__name__} is not fitted; call fit or fit_states first")
        return Fitted(self.features, self.head, self.history)

    def score_states(self, Z: Tensor) -> Tensor:
        """Scores [n] (float32, CPU) for hidden states Z [n, d]; NaN or infinite states are refused."""
        features, head, _ = self.require_fitted()
        Z = _as_states(Z, "hidden states")
        bad = (~torch.isfinite(Z).all(dim=1)).nonzero().flatten()
        if len(bad):
            raise ConfigError(
                f"the hidden states to score contain NaN or infinite values ({len(bad)} of "
                f"{len(Z)} rows, first row {int(bad[0])}); a float16 backbone can overflow: "
                "load it in float32"
            )
        # Row by row: a matrix product's rounding depends on how many rows it multiplies, so
        # scoring rows together made a text's score depend on what it was scored with.
        with torch.no_grad():
            rows = [head(features(z[None])) for z in Z]
        return torch.cat(rows).float().cpu() if rows else torch.zeros(0)

    def _extract_kwargs(self, batch_size: int, cache: bool, progress: bool) -> dict[str, Any]:
        """How this model reads texts (its layer, position and length), for `srlib.activations`."""
        if self.layer is None:
            raise ConfigError("this reward model has no layer recorded; set rm.layer before scoring texts")
        return dict(
            layer=self.layer,
            max_length=self.max_length,
            position=self.position,
            batch_size=batch_size,
            cache=cache,
            progress=progress,
        )

    def score(self, texts: list[str], *, batch_size: int = 16, cache: bool = True, progress: bool = False) -> Tensor:
        """Scores [n] for chat-formatted prompt+response texts, read through the backbone."""
        from srlib.activations import last_token_states

        self.require_fitted()
        kwargs = self._extract_kwargs(batch_size, cache, progress)
        return self.score_states(last_token_states(self.backbone, list(texts), **kwargs))

    def as_reward_function(self, *, name: str | None = None, **score_kwargs) -> RewardFunction:
        """This model as a TRL reward function (`RewardFunction`). Its completions are not written
        to the state cache (`cache=False` unless given): each training step's are new texts."""
        return super().as_reward_function(name=name, **{"cache": False, **score_kwargs})

    def score_pairs(
        self, pairs, *, batch_size: int = 16, cache: bool = True, progress: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(s_chosen, s_rejected), 1-D float32, for a list of `PreferencePair`s (empty in, empty out)."""
        self.require_fitted()
        Z_w, Z_l = self.read_pair_states(pairs, batch_size=batch_size, cache=cache, progress=progress)
        return self.score_states(Z_w), self.score_states(Z_l)

    def read_pair_states(
        self, pairs, *, batch_size: int = 16, cache: bool = True, progress: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The hidden states [n, d] this model reads for the chosen and rejected answers of
        `pairs` (its layer, token position and length limit; through its backbone and the
        activation cache): what `score_pairs` scores, and what `srlib.explain` attributes."""
        from srlib.activations import pair_states

        return pair_states(self.backbone, list(pairs), **self._extract_kwargs(batch_size, cache, progress))

    def num_trainable_parameters(self) -> int:
        """Trainable numbers of the head (the feature map and backbone are frozen)."""
        return self.require_fitted().head.num_trainable_parameters()

    # -- saving -------------------------------------------------------------------------------

    @property
    def rm_config(self) -> SparseRMConfig:
        """What this fitted model reads and how its head was trained, as one `SparseRMConfig`."""
        features, _, history = self.require_fitted()
        return SparseRMConfig(
            features=features.kind,
            k=self.k,
            layer=self.layer,
            sae_source=(self.sae_info or {}).get("source"),
            position=self.position,
            max_length=self.max_length,
            head=history.head_config(),
        )

    def config(self) -> dict[str, Any]:
        """The JSON description saved as config.json: the header, `rm_config.to_dict()` under
        "config", then what rebuilding and reading the model needs besides it."""
        features, _, history = self.require_fitted()
        return {
            **self._config_header(),
            "config": self.rm_config.to_dict(),
            "features": features.config(),
            "backbone": dict(self.backbone_record),
            "sae": self.sae_info,
            "latent_indices": self._latent_indices(),
            "directions_normalized": self.directions_normalized,
            "history": history.as_dict(),
        }

    def _latent_indices(self) -> dict[str, list[int]] | None:
        """The selected latents per side, as config.json's "latent_indices" entry."""
        if self.indices_w is None or self.indices_l is None:
            return None
        return {"w": self.indices_w, "l": self.indices_l}

    def fitted_parts(self) -> dict[str, Any]:
        """The keywords of the constructor that rebuild this fitted model (those `_load` reads from
        a saved folder): `type(rm)(**rm.fitted_parts())` is a copy sharing its feature map, head,
        history and backbone, built without touching `rm`."""
        return dict(
            features=self.features,
            backbone=self._backbone,
            layer=self.layer,
            max_length=self.max_length,
            position=self.position,
            sae_info=self.sae_info,
            head=self.require_fitted().head,
            history=self.history,
            k=self.k,
            latent_indices=self._latent_indices(),
            directions_normalized=self.directions_normalized,
            backbone_record=self.backbone_record,
        )

    def save_pretrained(
        self, directory: str | Path, *, overwrite: bool = True, model_card_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Write config.json + model.safetensors (+ sae/ for latent features) and the model card
        README.md (`srlib.hub.model_card`, given `model_card_kwargs`: training_data, evaluation,
        license, ...), atomically (`RewardModel.save_pretrained` says what may be replaced)."""
        from srlib.hub import model_card

        config = self.config()
        card = model_card(self, **(model_card_kwargs or {}))
        features, head, _ = self.require_fitted()
        tensors = {f"head.{name}": t for name, t in head.state_dict().items()}
        tensors.update({f"features.{name}": t for name, t in features.state_dict().items()})
        with atomic_path(directory, is_dir=True, overwrite=overwrite, is_ours=is_saved_reward_model) as tmp:
            save_file(
                {name: t.detach().cpu().contiguous() for name, t in tensors.items()},
                str(tmp / WEIGHTS_NAME),
                metadata={"format": "pt"},
            )
            if isinstance(features, LatentFeatures):
                features.sae.save_model(tmp / SAE_DIR_NAME)
            card.save(tmp / "README.md")
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def _load(cls, directory: Path, config: dict, backbone=None) -> FeatureRM:
        """Rebuild from config.json and model.safetensors, through the constructor."""
        return cls(**cls._saved_parts(directory, config, backbone))

    @classmethod
    def _saved_parts(cls, directory: Path, config: dict, backbone=None) -> dict[str, Any]:
        """The constructor's keywords (`fitted_parts`) read from config.json and model.safetensors;
        a file that does not fit raises a one-line `DamagedFileError` naming it (KeyError /
        TypeError: see `from_pretrained`)."""
        weights = directory / WEIGHTS_NAME
        tensors = read_tensors(weights, damaged_remedy(directory))
        rm_config, history = saved_rm_config(config, directory / CONFIG_NAME), FitHistory.from_dict(config["history"])
        kind, feature_config = rm_config.features, config["features"]
        sae = None
        if kind == LatentFeatures.kind:
            from srlib.sae import load_sae

            sae = load_sae(directory / SAE_DIR_NAME)
        feature_tensors = {name[len("features.") :]: t for name, t in tensors.items() if name.startswith("features.")}
        try:
            features = FEATURE_MAPS[kind].from_state(feature_config, feature_tensors, sae)
            head = RewardHead(features.out_dim, rm_config.head.hidden, rm_config.head.activation)
            head.load_state_dict({name[len("head.") :]: t for name, t in tensors.items() if name.startswith("head.")})
        except (KeyError, RuntimeError) as error:
            raise DamagedFileError(
                f"{weights}: its tensors do not match {directory / CONFIG_NAME} "
                f"({one_line(str(error))}); {damaged_remedy(directory)}"
            ) from None
        return dict(
            features=features,
            backbone=backbone,
            layer=rm_config.layer,
            max_length=rm_config.max_length,
            position=rm_config.position,
            sae_info=config["sae"],
            head=head,
            history=history,
            k=rm_config.k,
            latent_indices=config["latent_indices"],
            directions_normalized=config["directions_normalized"],
            backbone_record=config["backbone"],
        )


class SparseRM(FeatureRM):
    """SparseRM: a reward head on the projections of z onto the selected SAE directions.

    `SparseRM(directions)` for the paper's model (kind="projection"); kind="latents" (needs the
    `sae`) and kind="random" (`feature_seed`) are the Table 2 ablations on the same K.
    `SparseRM.fit(backbone, train_pairs, val_pairs, config=profile.sparserm_config(), sae=sae)`
    runs the whole method from text pairs.
    """

    kinds: ClassVar[tuple[str, ...]] = ("projection", "latents", "random")

    def __init__(
        self,
        directions=None,
        *,
        kind: str = "projection",
        sae=None,
        feature_seed: int = 0,
        backbone=None,
        layer: int | None = None,
        max_length: int = 512,
        sae_source: str | None = None,
        position: str = "last",
        features: FeatureMap | None = None,
        **saved,
    ):
        """`directions` (a `srlib.directions.Directions`) for a new model; a saved one is rebuilt
        from its `features` map and what `FeatureRM.__init__` takes (`saved`: head, history, ...)."""
        if (directions is None) == (features is None):
            raise ConfigError("a SparseRM needs its selected directions (srlib.directions.select_directions)")
        if features is not None:
            super().__init__(
                features, backbone=backbone, layer=layer, max_length=max_length, position=position, **saved
            )
            return
        if kind not in self.kinds:
            raise ConfigError(f"unknown SparseRM feature kind {kind!r}; choose one of: {', '.join(self.kinds)}")
        sae_info: dict[str, Any] | None = None if sae is None and sae_source is None else {"source": sae_source}
        if sae is not None:
            _check_sae(sae, int(directions.vectors.shape[1]))
            d_in, d_sae = _sae_dims(sae)
            sae_info = {"source": sae_source, "d_in": d_in, "d_sae": d_sae, "architecture": sae.cfg.architecture()}
        features = make_features(kind, directions=directions, sae=sae, seed=feature_seed)
        super().__init__(
            features, backbone=backbone, layer=layer, max_length=max_length, sae_info=sae_info, position=position
        )
        self.sae = sae
        self.directions = directions
        self.k = int(directions.k)
        self.indices_w = [int(i) for i in directions.indices_w]
        self.indices_l = [int(i) for i in directions.indices_l]
        self.directions_normalized = bool(getattr(directions, "normalized", False))

    @classmethod
    def fit(
        cls,
        backbone,
        train_pairs,
        val_pairs=None,
        *,
        config: SparseRMConfig,
        sae,
        batch_size: int = 16,
        cache: bool = True,
        progress: bool = True,
    ) -> SparseRM:
        """The whole method, as `config` says (`Profile.sparserm_config()` gives the profile's):
        hidden states of the pairs at `config.layer`, SAE latents of the training states, the
        top-`config.k` directions per side (`srlib.directions.select_directions`), the
        `config.features` map on them (the random ablation draws its directions with
        `config.head.seed`), then the head with the settings of `config.head` (`fit_head`). The
        fitted model's `rm_config` is `config`.

        Directions are selected on the training pairs only; `val_pairs` drive early stopping.
        `batch_size`, `cache` and `progress` say how states are extracted, not what the model is.
        A config or SAE that cannot work is refused in one line before anything is extracted.
        """
        config = cls._check_fit_config(config)
        if sae is None:
            raise ConfigError("SparseRM.fit needs an SAE (srlib.sae.sae_for_profile or load_pretrained_sae)")
        _check_sae(sae, backbone.hidden_size, config.k)
        extract = dict(batch_size=batch_size, cache=cache, progress=progress)
        Z_w, Z_l, val = cls._fit_states(backbone, train_pairs, val_pairs, config, **extract)
        from srlib.directions import select_directions
        from srlib.sae import encode

        assert config.k is not None  # SparseRMConfig requires K for every feature kind SparseRM fits
        directions = select_directions(sae, encode(sae, Z_w), encode(sae, Z_l), config.k)
        model = cls(
            directions,
            kind=config.features,
            sae=sae,
            feature_seed=config.head.seed,
            backbone=backbone,
            layer=config.layer,
            max_length=config.max_length,
            sae_source=config.sae_source,
            position=config.position,
        )
        return model.fit_states(Z_w, Z_l, *val, head=config.head, progress=progress)


class DenseRM(FeatureRM):
    """DenseRM (§5.2): the same head on the hidden state itself. The width is taken from the
    states at fit time (or give `d`)."""

    kinds: ClassVar[tuple[str, ...]] = ("dense",)

    def __init__(
        self,
        d: int | None = None,
        *,
        backbone=None,
        layer: int | None = None,
        max_length: int = 512,
        position: str = "last",
        features: FeatureMap | None = None,
        **saved,
    ):
        """`saved` (head, history, ...: `FeatureRM.__init__`) and `features` rebuild a saved model."""
        if features is None and d is not None:
            features = DenseFeatures(d)
        super().__init__(features, backbone=backbone, layer=layer, max_length=max_length, position=position, **saved)

    def _prepare_features(self, d: int) -> FeatureMap:
        if self.features is None:
            self.features = DenseFeatures(d)
        return super()._prepare_features(d)

    def attach_backbone(self, backbone, *, strict: bool = True) -> DenseRM:
        if self.features is None:
            self.features = DenseFeatures(backbone.hidden_size)
        return super().attach_backbone(backbone, strict=strict)

    @classmethod
    def fit(
        cls,
        backbone,
        train_pairs,
        val_pairs=None,
        *,
        config: SparseRMConfig,
        batch_size: int = 16,
        cache: bool = True,
        progress: bool = True,
    ) -> DenseRM:
        """Hidden states of the pairs as `config` reads them (features="dense":
        `Profile.sparserm_config("dense")`), then the head with the settings of `config.head`
        (`fit_head`). The fitted model's `rm_config` is `config`; `batch_size`, `cache` and
        `progress` say how states are extracted."""
        config = cls._check_fit_config(config)
        extract = dict(batch_size=batch_size, cache=cache, progress=progress)
        Z_w, Z_l, val = cls._fit_states(backbone, train_pairs, val_pairs, config, **extract)
        model = cls(backbone=backbone, layer=config.layer, max_length=config.max_length, position=config.position)
        return model.fit_states(Z_w, Z_l, *val, head=config.head, progress=progress)
