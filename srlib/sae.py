"""Sparse autoencoders through sae-lens: a pretrained one, or one trained here on the backbone.

The paper reads Gemma Scope SAEs (`SAE.from_pretrained`). SmolLM2 has no published SAE, so
the cpu and smoke profiles train one with sae-lens's own trainer (`SAETrainer`, by default a
TopK SAE, whose training step, like a BatchTopK SAE's, `srlib.topk_training` computes from
the kept latents;
`SAETrainingConfig.architecture` picks another of sae-lens's trainers) on the backbone's
activations and keep it in sae-lens's format. Where an SAE comes from is a
profile's `sae_source`:

* `"sae-lens:<release>/<sae_id>"`: `SAE.from_pretrained(release, sae_id)`; the sae_id may
  contain slashes (the release never does), e.g.
  `sae-lens:gemma-scope-2b-pt-res-canonical/layer_13/width_16k/canonical`;
* `"train"`: `train_sae` on `default_sae_corpus` (below), cached;
* a local folder holding a saved sae-lens SAE (`cfg.json` + weights).

Training data (`train_sae`). Two kinds of rows, mixed in every batch:

1. every token of the corpus texts (`srlib.activations.iter_token_activations`: padding, BOS
   and the chat template's system-prompt header excluded), minus "attention sink" rows whose
   norm exceeds `OUTLIER_NORM_FACTOR` times the median (the first kept token of a text that
   lost its head to truncation gets a norm about 100 times the others; a handful of them
   would otherwise dominate the squared error);
2. the LAST token of each text, the position the reward model reads, as a share
   `config.last_token_share` of every batch. An SAE trained on all tokens alone reconstructs
   those positions poorly (held-out FVE 0.52 against 0.82 over all tokens, see the project's
   measurements): they are few, and they sit in a tight cluster whose small variance is what
   FVE divides by.

The corpus rows are held in memory and reshuffled each pass (the buffer is the whole corpus,
so the shuffle is exact); the last tokens are drawn the same way from their own pool. A slice
of the texts (`HOLDOUT_FRACTION`, fixed seed) is held out and never trained on; the SAE's
report on it is saved beside the weights. The corpus activations are cached too
(`corpus_activations`), so another SAE config on the same corpus skips the backbone. The
training is seeded by `config.seed` (same inputs, same weights); wandb stays off.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

with warnings.catch_warnings():
    # sae-lens 6.54 imports `transformer_lens.utils`, which TransformerLens 3.9 deprecates:
    # a note for sae-lens's maintainers, not for a reader of the book.
    warnings.filterwarnings("ignore", message="The 'utils' module has been deprecated", category=DeprecationWarning)
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from srlib.activations import (
    DEFAULT_POSITION,
    POSITIONS,
    _check_layer,
    iter_token_activations_at_layers,
    layers_label,
    token_states,
)
from srlib.backbone import Backbone, format_pair, format_text
from srlib.cache import check_safetensors, clear_command, read_cache_entry, read_json, warn_recomputing
from srlib.data import load_arc_prompts, load_pairs
from srlib.errors import ConfigError, DamagedFileError, DataError, one_line
from srlib.paths import atomic_path, cache_dir
from srlib.profiles import SAE_ARCHITECTURES, Profile, SAETrainingConfig
from srlib.progress import progress_bar
from srlib.topk_training import GATHER_CLASSES

#: Share of the corpus texts held out from SAE training to measure its quality.
HOLDOUT_FRACTION = 0.05
#: Token rows with a norm above this multiple of the median norm are left out (attention sinks).
OUTLIER_NORM_FACTOR = 10.0
#: The train splits whose chosen and rejected texts make the default corpus (test splits never).
CORPUS_SPLITS = ("truthfulqa:train", "hh-harmless:train", "pku-saferlhf:train")
#: SAETrainingConfig fields added after SAEs were first cached: at their default they stay out
#: of the cache key, so the SAEs cached before them (today's cpu book) are still found.
_KEY_OMITS_AT_DEFAULT = ("architecture", "sparsity_coefficient")
#: Written beside the sae-lens files of a trained SAE: cache key parts, report, corpus, timing.
INFO_FILENAME = "srlib_sae.json"
# Bump when the training procedure changes, so that older cached SAEs are not reused.
_TRAINING_FORMAT = 5
_ENCODE_BATCH = 4096


@dataclass(frozen=True)
class SAEReport:
    """How well an SAE fits a set of activations.

    `fve` = 1 - sum ||z - z_hat||^2 / sum ||z - mean(z)||^2 over the n rows (NaN when all rows
    are equal); `l0` = mean number of latents > 0 per row; `dead_fraction` = share of latents
    that never fire on these rows.
    """

    l0: float
    fve: float
    dead_fraction: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @property
    def alive_fraction(self) -> float:
        """Share of latents that fire on at least one of these rows."""
        return 1.0 - self.dead_fraction


@dataclass(frozen=True)
class SAEQuality:
    """An SAE's quality on one set of texts, over all their tokens and at the token the reward
    model reads (`position`).

    The all-token figures are what SAE training optimises and usually reports; the reward
    model reads one token per text, and an SAE can look healthy over all tokens while most of
    its latents never fire at that token and its FVE there is lower. `all_tokens` is None when
    only the read position was measured.
    """

    read_position: SAEReport
    all_tokens: SAEReport | None
    position: str = DEFAULT_POSITION

    def as_row(self) -> dict[str, float | int | None]:
        """Flat columns for a table, each figure at the read position ("read") beside the same
        over all tokens ("all"): alive share (%), FVE, L0 and the number of rows measured."""
        figures = {
            "alive %": lambda r: 100 * r.alive_fraction,
            "FVE": lambda r: r.fve,
            "L0": lambda r: r.l0,
            "rows": lambda r: r.n,
        }
        return {
            f"{name} {where}": None if report is None else figure(report)
            for name, figure in figures.items()
            for where, report in (("read", self.read_position), ("all", self.all_tokens))
        }

    def as_dict(self) -> dict:
        return {
            "position": self.position,
            "read_position": self.read_position.as_dict(),
            "all_tokens": None if self.all_tokens is None else self.all_tokens.as_dict(),
        }


@dataclass(frozen=True)
class SAESource:
    """A parsed `profile.sae_source`: kind "train", "sae-lens" (release, sae_id) or "disk" (path)."""

    kind: str
    release: str | None = None
    sae_id: str | None = None
    path: Path | None = None


def parse_sae_source(source: str) -> SAESource:
    """Parse "train", "sae-lens:<release>/<sae_id>" or a folder with a saved sae-lens SAE."""
    if source == "train":
        return SAESource("train")
    if source.startswith("sae-lens:"):
        release, _, sae_id = source[len("sae-lens:") :].partition("/")
        if release and sae_id:
            return SAESource("sae-lens", release=release, sae_id=sae_id)
    elif (Path(source).expanduser() / SAE_CFG_FILENAME).is_file():
        return SAESource("disk", path=Path(source).expanduser())
    raise ConfigError(
        f"bad sae_source {source!r}: use 'train', 'sae-lens:<release>/<sae_id>' or a folder "
        f"holding a saved sae-lens SAE ({SAE_CFG_FILENAME} and weights)"
    )


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu") -> SAE:
    """A published SAE through sae-lens's registry, e.g. Gemma Scope (needs the hub or its cache)."""
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except (OSError, ValueError, KeyError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"cannot load SAE {release}/{sae_id} through sae-lens: {reason}") from None


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """An SAE saved in sae-lens's format (`save_model`), e.g. one `train_sae` cached.

    A damaged folder (config not JSON or missing a key, weights missing, empty or truncated)
    raises a one-line `DamagedFileError` naming the file; nothing in the folder is run (sae-lens
    reads the weights with safetensors and maps the architecture through its own registry).
    """
    path = Path(path)
    if not (path / SAE_CFG_FILENAME).is_file():
        raise ConfigError(f"{path} holds no saved sae-lens SAE ({SAE_CFG_FILENAME} missing)")
    remedy = f"save the SAE again, or if it is in srlib's cache clear it: {clear_command('sae')}"
    read_json(path / SAE_CFG_FILENAME, remedy)
    weights = path / SAE_WEIGHTS_FILENAME
    check_safetensors(weights, remedy)  # missing, empty or truncated weights: one line naming the file
    try:
        return SAE.load_from_disk(path, device=device)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as error:
        raise DamagedFileError(f"{path}: not a loadable sae-lens SAE ({one_line(str(error))}); {remedy}") from None


def save_sae(sae: SAE, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write `sae` in sae-lens's on-disk format, atomically: `cfg.json` (architecture, widths and
    the metadata: model_name, hook_name, and for an SAE trained here what `train_sae` recorded
    under "srlib") and `sae_weights.safetensors`, as `SAE.save_model` writes them, so that
    `SAE.load_from_disk(directory)` (or `load_sae`) reads it back. An existing saved SAE is
    replaced only with `overwrite`; a folder holding anything else is refused."""
    with atomic_path(
        directory, is_dir=True, overwrite=overwrite, is_ours=lambda path: (path / SAE_CFG_FILENAME).is_file()
    ) as tmp:
        sae.save_model(tmp)
    return Path(directory)


def check_width(sae: SAE, d: int) -> None:
    """Raise ConfigError unless the SAE reads d-dimensional activations."""
    if sae.cfg.d_in != d:
        raise ConfigError(f"width mismatch: the SAE reads {sae.cfg.d_in}-dimensional activations, these are {d}")


@torch.no_grad()
def encode(sae: SAE, Z: Tensor) -> Tensor:
    """SAE latents f(z) of each row of Z: [n, d] -> [n, d_sae], float32 on the CPU."""
    check_width(sae, Z.shape[-1])
    chunks = [
        sae.encode(Z[i : i + _ENCODE_BATCH].to(sae.device, sae.dtype)).float().cpu()
        for i in range(0, len(Z), _ENCODE_BATCH)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0, sae.cfg.d_sae)


@torch.no_grad()
def sae_report(sae: SAE, activations: Tensor) -> SAEReport:
    """Reconstruction quality (FVE), sparsity (L0) and dead latents of `sae` on `activations`."""
    check_width(sae, activations.shape[-1])
    n = len(activations)
    if n == 0:
        raise DataError("sae_report needs at least one activation row")
    mean = activations.double().mean(dim=0)
    sse = sst = 0.0
    active_total = 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, n, _ENCODE_BATCH):
        z = activations[i : i + _ENCODE_BATCH].to(sae.device, sae.dtype)
        f = sae.encode(z)
        z_hat = sae.decode(f)
        sse += (z - z_hat).double().pow(2).sum().item()
        sst += (z.double() - mean.to(z.device)).pow(2).sum().item()
        active = (f > 0).cpu()
        active_total += int(active.sum())
        fired |= active.any(dim=0)
    return SAEReport(
        l0=active_total / n,
        fve=1.0 - sse / sst if sst > 0 else math.nan,
        dead_fraction=1.0 - fired.float().mean().item(),
        n=n,
    )


def alive_fraction(latents: Tensor) -> float:
    """Share of latents (columns of `latents` [n, d_sae]) that fire (> 0) on at least one row."""
    return float((latents > 0).any(dim=0).float().mean())


def sae_quality(
    sae: SAE,
    backbone: Backbone,
    texts: Sequence[str],
    layer: int,
    *,
    position: str = DEFAULT_POSITION,
    all_tokens: bool = True,
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = True,
) -> SAEQuality:
    """`sae`'s quality on `texts` (e.g. the chat-formatted answers of validation pairs) at the
    token the reward model reads and, with `all_tokens`, over all their tokens.

    The read-position states come from the activation cache where they are (the reward
    model's own `token_states`); the all-token rows are those SAE training uses (template
    header and attention-sink outliers left out), from one forward pass that also fills
    that cache, so the read position then costs nothing more.
    """
    texts = list(texts)
    if not texts:
        raise DataError("sae_quality needs at least one text")
    every = None
    if all_tokens:
        tokens, _, _ = _collect(backbone, texts, (layer,), max_length, batch_size, progress=progress)[layer]
        every = sae_report(sae, tokens)
    read = token_states(
        backbone, texts, layer, positions=(position,), max_length=max_length, batch_size=batch_size, progress=progress
    )[position]
    return SAEQuality(read_position=sae_report(sae, read), all_tokens=every, position=position)


def sae_info(sae: SAE) -> dict | None:
    """What `train_sae` recorded about this SAE (the `srlib_sae.json` contents), or None."""
    return sae.cfg.metadata.get("srlib")


def default_sae_corpus(tokenizer, *, max_pairs: int | None = None, max_tokens: int | None = None) -> list[str]:
    """The texts the profile SAEs are trained on: local TRAIN splits only, no labels used.

    Chosen and rejected texts of TruthfulQA (questions with their answers), HH-RLHF harmless
    and PKU-SafeRLHF train pairs, both sides alike (which side is preferred is never read),
    plus the ARC-Challenge questions with an empty answer (the prompts of the alignment
    step; no answer, so no gold label). Chat-formatted with `format_text`; duplicates
    removed. No validation or test split is in it, so reward-model test pairs stay unseen by
    the SAE. `max_pairs` keeps the first pairs (and ARC questions) of each set.

    `max_tokens` caps the corpus for time: the four sets share the budget equally, a set
    smaller than its share is taken whole and leaves the rest to the others, and a set
    larger than its share keeps its first texts (the loaders' seeded order) that fit.
    """
    sources = [
        [text for pair in load_pairs(spec, max_pairs=max_pairs) for text in format_pair(tokenizer, pair)]
        for spec in CORPUS_SPLITS
    ]
    sources.append([format_text(tokenizer, q.question, "") for q in load_arc_prompts()[:max_pairs]])
    sources = [list(dict.fromkeys(texts)) for texts in sources]
    if max_tokens is not None:
        sources = _share_token_budget(tokenizer, sources, max_tokens)
    return list(dict.fromkeys(text for texts in sources for text in texts))


def _share_token_budget(tokenizer, sources: list[list[str]], budget: int) -> list[list[str]]:
    """Each source's longest prefix within an equal share of `budget` tokens (water-filling)."""
    lengths = [[len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else [] for texts in sources]
    kept: list[list[str]] = [[] for _ in sources]
    order = sorted(range(len(sources)), key=lambda i: sum(lengths[i]))
    for rank, i in enumerate(order):
        share = budget / (len(sources) - rank)
        cumulative = torch.tensor(lengths[i], dtype=torch.long).cumsum(0)
        n = int((cumulative <= share).sum())
        kept[i] = sources[i][:n]
        budget -= int(cumulative[n - 1]) if n else 0
    return kept


DEFAULT_CORPUS_DESCRIPTION = (
    "chosen and rejected texts of the truthfulqa, hh-harmless and pku-saferlhf TRAIN splits "
    "and the ARC-Challenge questions (empty answer), chat-formatted; no labels, no val/test split"
)


def sae_for_profile(
    profile: Profile,
    backbone: Backbone,
    corpus_texts: Sequence[str] | None = None,
    *,
    progress: bool = True,
) -> SAE:
    """The SAE a profile names (`profile.sae_source`), checked against the backbone's width.

    "train" trains (or loads from the cache) an SAE at `profile.layer` on `corpus_texts`,
    by default `default_sae_corpus(tokenizer, max_pairs=profile.max_pairs,
    max_tokens=profile.sae_corpus_tokens)`.
    """
    source = parse_sae_source(profile.sae_source)
    if source.kind == "train":
        if profile.sae_training is None:
            raise ConfigError(f"profile {profile.name!r} has sae_source 'train' but no sae_training")
        texts, description = _profile_corpus(profile, backbone, corpus_texts)
        sae = train_sae(
            backbone,
            profile.layer,
            texts,
            profile.sae_training,
            max_length=profile.max_length,
            batch_size=profile.batch_size,
            corpus_description=description,
            progress=progress,
        )
    elif source.kind == "sae-lens":
        assert source.release is not None and source.sae_id is not None  # parse_sae_source sets both
        sae = load_pretrained_sae(source.release, source.sae_id, device=str(backbone.device))
    else:
        assert source.path is not None  # kind "disk": parse_sae_source sets the folder
        sae = load_sae(source.path, device=str(backbone.device))
    check_width(sae, backbone.hidden_size)
    _check_hook_layer(sae, profile.layer)
    return sae


def _profile_corpus(
    profile: Profile, backbone: Backbone, corpus_texts: Sequence[str] | None = None
) -> tuple[list[str], str]:
    """(texts, description) of the corpus `sae_for_profile` trains the profile's SAE on."""
    if corpus_texts is not None:
        return list(corpus_texts), "texts given by the caller"
    budget = profile.sae_corpus_tokens
    texts = default_sae_corpus(backbone.tokenizer, max_pairs=profile.max_pairs, max_tokens=budget)
    return texts, DEFAULT_CORPUS_DESCRIPTION + (f", at most {budget:,} tokens" if budget is not None else "")


def extract_sae_corpora(backbone: Backbone, profiles: Sequence[Profile], *, progress: bool = True) -> list[int]:
    """Fill the corpus cache that `sae_for_profile` will train on for each of `profiles` (a
    layer sweep: one profile per layer, `srlib.experiments.profile_at_layer`), every layer of a
    corpus from one pass (`corpus_activations_at_layers`), so the SAEs trained next find their
    activations cached. Only profiles whose SAE is trained here and not cached yet count.
    Returns their layers (the corpora requested, cached ones read rather than recomputed).
    """
    groups: dict[tuple, list[int]] = {}
    for profile in profiles:
        texts = _corpus_to_train_on(profile, backbone)
        if texts is not None:
            layers = groups.setdefault((tuple(texts), profile.max_length, profile.batch_size), [])
            if profile.layer not in layers:
                layers.append(profile.layer)
    for (texts, max_length, batch_size), layers in groups.items():
        corpus_activations_at_layers(
            backbone, layers, texts, max_length=max_length, batch_size=batch_size, progress=progress
        )
    return [layer for layers in groups.values() for layer in layers]


def sae_to_train(profile: Profile, backbone: Backbone) -> bool:
    """Whether `sae_for_profile(profile, backbone)` would train an SAE: the profile trains its
    own (`sae_source` "train") and no SAE of its corpus and config is in the cache yet."""
    return _corpus_to_train_on(profile, backbone) is not None


def _corpus_to_train_on(profile: Profile, backbone: Backbone) -> list[str] | None:
    """The corpus texts of the SAE `sae_for_profile(profile, backbone)` would train, or None
    when it would train none (a pretrained source, or the SAE is cached)."""
    if parse_sae_source(profile.sae_source).kind != "train" or profile.sae_training is None:
        return None
    texts, _ = _profile_corpus(profile, backbone)
    key, _ = sae_cache_key(backbone, profile.layer, texts, profile.sae_training, max_length=profile.max_length)
    return None if _is_trained(cache_dir("sae") / key) else texts


def _check_hook_layer(sae: SAE, layer: int) -> None:
    """Raise ConfigError when the SAE's hook names a residual-stream layer other than `layer`."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", str(sae.cfg.metadata.get("hook_name")))
    if match and int(match.group(1)) != layer:
        raise ConfigError(f"layer mismatch: the SAE was trained on {match.group(0)}, the profile reads layer {layer}")


@dataclass
class CorpusActivations:
    """Layer activations of an SAE corpus: its training texts and its held-out texts.

    `*_tokens`: every token row (template header, padding and outliers removed);
    `*_last`: the last-token row of each text. `info`: counts and the extraction time.
    `from_cache`: whether this call read them from disk instead of running the backbone.
    """

    train_tokens: Tensor
    train_last: Tensor
    heldout_tokens: Tensor
    heldout_last: Tensor
    info: dict
    from_cache: bool = False


def corpus_activations(
    backbone: Backbone,
    layer: int,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = True,
) -> CorpusActivations:
    """The activations `train_sae` trains and evaluates on, cached on disk.

    The held-out texts are a random `HOLDOUT_FRACTION` of `texts` (at least one) drawn with
    a fixed seed, so every SAE trained on the same corpus is judged on the same texts.
    Cached as float32 safetensors under `cache_dir("sae-corpus", key)` (about 2.3 KB per
    token for d=576), so that another SAE config on the same corpus skips the forward passes.
    The one-layer case of `corpus_activations_at_layers`.
    """
    layer = _check_layer(backbone, layer)
    return corpus_activations_at_layers(
        backbone, (layer,), texts, max_length=max_length, batch_size=batch_size, progress=progress
    )[layer]


def corpus_activations_at_layers(
    backbone: Backbone,
    layers: Sequence[int],
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, CorpusActivations]:
    """{layer: `corpus_activations(backbone, layer, texts)`}, the layers not yet cached from ONE
    pass over the corpus that stops at the deepest of them (a layer sweep's SAEs then cost one
    corpus pass, not one per layer). Each layer is cached under the key `corpus_activations`
    uses, with the same bits as a pass of its own (the same batches); a cached layer is read,
    not recomputed.
    """
    texts = list(texts)
    if len(texts) < 2:
        raise DataError(f"an SAE corpus needs at least 2 texts (one is held out), got {len(texts)}")
    layers = list(dict.fromkeys(_check_layer(backbone, layer) for layer in layers))
    if not layers:
        raise ConfigError("corpus_activations_at_layers needs at least one layer")
    found = {layer: _cached_corpus(backbone, layer, texts, max_length) for layer in layers}
    missing = [layer for layer, data in found.items() if data is None]
    if missing:
        found.update(_extract_corpora(backbone, missing, texts, max_length, batch_size, progress))
    return {layer: data for layer, data in found.items() if data is not None}


def _cached_corpus(backbone: Backbone, layer: int, texts: list[str], max_length: int) -> CorpusActivations | None:
    """The cached corpus activations of one layer, or None (absent, or damaged: warned about)."""
    key, _ = _corpus_key(backbone, layer, texts, max_length)
    final = cache_dir("sae-corpus") / key
    if not (final / "info.json").is_file():
        return None
    names = {"train_tokens", "train_last", "heldout_tokens", "heldout_last"}
    tensors = read_cache_entry(final / "activations.safetensors", "sae-corpus", check=lambda found: set(found) == names)
    try:
        info = read_json(final / "info.json", clear_command("sae-corpus"))
    except DamagedFileError as error:
        warn_recomputing(final / "info.json", error)
        return None
    return None if tensors is None else CorpusActivations(**tensors, info=info, from_cache=True)


def _extract_corpora(
    backbone: Backbone, layers: list[int], texts: list[str], max_length: int, batch_size: int, progress: bool
) -> dict[int, CorpusActivations]:
    """Run the corpus once to the deepest of `layers`, one progress bar; cache each layer's result."""
    start = time.perf_counter()
    train_texts, heldout_texts = _split_holdout(texts)
    with progress_bar(
        total=len(texts), desc=f"SAE corpus, {layers_label(layers)}", unit="text", disable=not progress
    ) as bar:
        train = _collect(backbone, train_texts, layers, max_length, batch_size, bar=bar)
        heldout = _collect(backbone, heldout_texts, layers, max_length, batch_size, bar=bar)
    seconds = round(time.perf_counter() - start, 1)
    result = {}
    for layer in layers:
        key, parts = _corpus_key(backbone, layer, texts, max_length)
        (train_tokens, train_last, train_dropped), (heldout_tokens, heldout_last, heldout_dropped) = (
            train[layer],
            heldout[layer],
        )
        info = {
            "key": key,
            "key_parts": parts,
            "n_train_texts": len(train_texts),
            "n_heldout_texts": len(heldout_texts),
            "outlier_rows_dropped": train_dropped + heldout_dropped,
            "extraction_seconds": seconds,
            "layers_in_the_pass": layers,
        }
        tensors = {
            "train_tokens": train_tokens,
            "train_last": train_last,
            "heldout_tokens": heldout_tokens,
            "heldout_last": heldout_last,
        }
        with atomic_path(cache_dir("sae-corpus") / key, is_dir=True) as tmp:
            save_file(tensors, tmp / "activations.safetensors")
            (tmp / "info.json").write_text(json.dumps(info, indent=1))
        result[layer] = CorpusActivations(train_tokens, train_last, heldout_tokens, heldout_last, info=info)
    return result


def _corpus_key(backbone: Backbone, layer: int, texts: list[str], max_length: int) -> tuple[str, dict]:
    corpus = hashlib.sha256()
    for text in texts:
        corpus.update(hashlib.sha256(text.encode()).digest())
    parts = {
        "backbone": backbone.identity,
        "layer": layer,
        "corpus_sha256": corpus.hexdigest(),
        "n_texts": len(texts),
        "max_length": max_length,
        "holdout_fraction": HOLDOUT_FRACTION,
        "outlier_norm_factor": OUTLIER_NORM_FACTOR,
    }
    return _hash(parts), parts


def _hash(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def sae_cache_key(
    backbone: Backbone, layer: int, texts: Sequence[str], config: SAETrainingConfig, *, max_length: int = 512
) -> tuple[str, dict]:
    """(key, parts): what a trained SAE depends on, and its hash (the cache folder's name)."""
    _, parts = _corpus_key(backbone, layer, list(texts), max_length)
    defaults = {f.name: f.default for f in fields(SAETrainingConfig) if f.name in _KEY_OMITS_AT_DEFAULT}
    settings = {
        name: value
        for name, value in asdict(config).items()
        if name != "dead_window_divisor" and not (name in defaults and value == defaults[name])
    }
    parts = {
        **parts,
        "config": settings,
        "dead_window_divisor": config.dead_window_divisor,
        "training_format": _TRAINING_FORMAT,
    }
    return _hash(parts), parts


def _is_trained(folder: Path) -> bool:
    """Whether `folder` (a `cache_dir("sae")` entry) holds a trained SAE: its srlib_sae.json is
    written inside the temporary folder that `atomic_path` moves into place whole."""
    return (folder / INFO_FILENAME).is_file()


def train_sae(
    backbone: Backbone,
    layer: int,
    texts: Sequence[str],
    config: SAETrainingConfig,
    *,
    max_length: int = 512,
    batch_size: int = 16,
    corpus_description: str = "texts given by the caller",
    progress: bool = True,
) -> SAE:
    """Train an SAE (`config.architecture`) with sae-lens on layer-`layer` activations of `texts`, or load it.

    The result is cached in sae-lens's format under `cache_dir("sae", key)` (see
    `sae_cache_key`), with `srlib_sae.json` beside it (also in `sae.cfg.metadata["srlib"]`,
    read it with `sae_info`): the key's parts, the report on the held-out texts over all
    their tokens and at their last tokens, the corpus description and the timings. A second
    call with the same inputs loads the cached SAE. `batch_size` is the forward-pass batch.
    """
    texts = list(texts)
    _check_config(config)
    key, parts = sae_cache_key(backbone, layer, texts, config, max_length=max_length)
    final = cache_dir("sae") / key
    if _is_trained(final):
        try:
            return load_sae(final, device=str(backbone.device))
        except DamagedFileError as error:
            warn_recomputing(final, error)

    cpu_start = time.process_time()
    data = corpus_activations(backbone, layer, texts, max_length=max_length, batch_size=batch_size, progress=progress)
    fit_start = time.perf_counter()
    # an SAE on states read under autocast trains under sae-lens's autocast too (bfloat16)
    training_sae = _fit(data.train_tokens, data.train_last, config, progress, autocast=backbone.autocast is not None)
    fit_s, cpu_s = time.perf_counter() - fit_start, time.process_time() - cpu_start
    with atomic_path(final, is_dir=True) as tmp:
        training_sae.cfg.metadata.model_name = backbone.model_id
        training_sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        training_sae.save_inference_model(tmp)  # folds decoder norms: W_dec rows unit-norm
        sae = load_sae(tmp, device="cpu")
        info = {
            "key": key,
            "key_parts": parts,
            "corpus": {
                "description": corpus_description,
                "n_texts": len(texts),
                "n_train_texts": data.info["n_train_texts"],
                "n_heldout_texts": data.info["n_heldout_texts"],
                "outlier_rows_dropped": data.info["outlier_rows_dropped"],
            },
            "training": {
                "token_rows": len(data.train_tokens),
                "last_token_rows": len(data.train_last),
                "samples_seen": _steps(config) * config.batch_size,
                "extraction_seconds": data.info["extraction_seconds"],
                "activations_from_cache": data.from_cache,
                "fit_seconds": round(fit_s, 1),
                "seconds": round(data.info["extraction_seconds"] + fit_s, 1),
                "cpu_seconds_this_run": round(cpu_s, 1),
                "torch_threads": torch.get_num_threads(),
            },
            "heldout": {
                "all_tokens": sae_report(sae, data.heldout_tokens).as_dict(),
                "last_tokens": sae_report(sae, data.heldout_last).as_dict(),
            },
        }
        sae.cfg.metadata.srlib = info
        sae.save_model(tmp)
        (tmp / INFO_FILENAME).write_text(json.dumps(info, indent=1))
    return sae.to(backbone.device)


def _check_config(config: SAETrainingConfig) -> None:
    if config.architecture not in SAE_ARCHITECTURES:
        raise ConfigError(
            f"unknown SAE architecture {config.architecture!r}; choose among: {', '.join(SAE_ARCHITECTURES)}"
        )
    if config.dead_window_divisor < 1:
        raise ConfigError(f"dead_window_divisor must be >= 1, got {config.dead_window_divisor}")
    coefficient = config.sparsity_coefficient
    if coefficient is not None and not (math.isfinite(coefficient) and coefficient >= 0):
        raise ConfigError(f"sparsity_coefficient must be a finite number >= 0, got {coefficient}")
    if not 1 <= config.k <= config.d_sae:
        raise ConfigError(f"SAE k={config.k} must be between 1 and d_sae={config.d_sae}")
    if not 0.0 <= config.last_token_share <= 1.0:
        raise ConfigError(f"last_token_share must be in [0, 1], got {config.last_token_share}")
    if not (math.isfinite(config.lr) and config.lr > 0 and math.isfinite(config.lr_end) and config.lr_end >= 0):
        raise ConfigError(f"SAE lr must be a finite number > 0 and lr_end one >= 0, got {config.lr}, {config.lr_end}")
    if _steps(config) < 1:
        raise ConfigError(f"training_tokens={config.training_tokens} is less than one batch of {config.batch_size}")


def _steps(config: SAETrainingConfig) -> int:
    return config.training_tokens // config.batch_size


def _split_holdout(texts: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-out): a random `HOLDOUT_FRACTION` of the texts (at least one), seed 0."""
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    heldout = set(order[: max(1, round(HOLDOUT_FRACTION * len(texts)))])
    return ([t for i, t in enumerate(texts) if i not in heldout], [t for i, t in enumerate(texts) if i in heldout])


def _collect(
    backbone: Backbone,
    texts: list[str],
    layers: Sequence[int],
    max_length: int,
    batch_size: int,
    *,
    progress: bool = True,
    bar: tqdm | None = None,
) -> dict[int, tuple[Tensor, Tensor, int]]:
    """{layer: (token rows without outliers [N, d], last-token rows [n_texts, d], outliers
    dropped)}, every layer from one pass; `bar` (an open progress bar) is advanced per text."""
    # The same pass stores each text's reward-model states (every read position): the pair
    # states of the training texts in the corpus then cost no second forward pass.
    per_text: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for rows in iter_token_activations_at_layers(
        backbone,
        texts,
        layers,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
        cache_positions=POSITIONS,
        bar=bar,
    ):
        for layer, t in rows.items():
            if len(t):
                per_text[layer].append(t)
    result = {}
    for layer in list(per_text):
        kept_texts = per_text.pop(layer)  # one layer's rows at a time in two copies, not every layer's
        if not kept_texts:
            raise DataError("the SAE corpus has no tokens outside the chat template's header")
        tokens = torch.cat(kept_texts)
        kept = _without_outliers(tokens)
        result[layer] = (kept, torch.stack([t[-1] for t in kept_texts]), len(tokens) - len(kept))
    return result


def _without_outliers(rows: Tensor) -> Tensor:
    """`rows` minus those whose norm exceeds `OUTLIER_NORM_FACTOR` times the median norm."""
    norms = rows.norm(dim=1)
    return rows[norms <= OUTLIER_NORM_FACTOR * norms.median()]


def _shuffled_rows(rows: Tensor, size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless chunks of `size` rows; each pass over `rows` is a fresh random permutation."""
    pending = torch.zeros(0, dtype=torch.long)
    while True:
        while len(pending) < size:
            pending = torch.cat([pending, torch.randperm(len(rows), generator=generator)])
        yield rows[pending[:size]]
        pending = pending[size:]


def _mixed_batches(
    tokens: Tensor, last: Tensor, batch_size: int, last_share: float, generator: torch.Generator
) -> Iterator[Tensor]:
    """Batches of `batch_size` rows: round(share x size) last-token rows, the rest all-token rows."""
    n_last = round(batch_size * last_share)
    token_chunks = _shuffled_rows(tokens, batch_size - n_last, generator)
    last_chunks = _shuffled_rows(last, n_last, generator)
    while True:
        yield torch.cat([next(token_chunks), next(last_chunks)])


def _training_sae(config: SAETrainingConfig, d_in: int) -> TrainingSAE:
    """A fresh sae-lens training SAE of `config.architecture`, from sae-lens's own registry;
    `k` goes to the TopK kinds, `sparsity_coefficient` (if set) to JumpReLU's l0 / standard's l1."""
    sae_class, cfg_class = get_sae_training_class(config.architecture)
    # the same SAEs, their training step without dense decoding (srlib.topk_training)
    sae_class = GATHER_CLASSES.get(config.architecture, sae_class)
    options: dict = {}
    if config.architecture in ("topk", "batchtopk"):
        options["k"] = config.k if config.architecture == "topk" else float(config.k)
    elif config.sparsity_coefficient is not None:
        name = "l0_coefficient" if config.architecture == "jumprelu" else "l1_coefficient"
        options[name] = config.sparsity_coefficient
    return sae_class(cfg_class(d_in=d_in, d_sae=config.d_sae, **options))


def _fit(
    tokens: Tensor, last: Tensor, config: SAETrainingConfig, progress: bool, *, autocast: bool = False
) -> TrainingSAE:
    """Train sae-lens's SAE of `config.architecture` with its `SAETrainer` (Adam, cosine lr to
    `lr_end`; for the TopK kinds, the AuxK loss on dead latents); with `autocast`, each step's
    forward pass runs under sae-lens's bfloat16 autocast (the parameters and Adam stay float32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer_cfg = SAETrainerConfig(
        total_training_samples=_steps(config) * config.batch_size,
        train_batch_size_samples=config.batch_size,
        lr=config.lr,
        lr_end=config.lr_end,
        lr_scheduler_name="cosineannealing",
        # A latent silent for 1/dead_window_divisor (default a tenth) of the run counts as dead
        # and gets sae-lens's AuxK loss. sae-lens's default window (1,000 steps) is most of a
        # short CPU run and left most latents dead on held-out tokens; a tenth revives them. The dead share and FVE of
        # each choice: `python benchmarks/sae_quality.py --profile cpu`.
        dead_feature_window=max(1, _steps(config) // config.dead_window_divisor),
        device=device,
        autocast=autocast,
        logger=LoggingConfig(log_to_wandb=False),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sae = _training_sae(config, tokens.shape[1])
    sae.to(device)  # initialised on the CPU, so a seed gives the same start on any device
    generator = torch.Generator().manual_seed(config.seed)
    batches = _mixed_batches(tokens, last, config.batch_size, config.last_token_share, generator)
    trainer = SAETrainer(trainer_cfg, sae, batches)
    # SAETrainer.fit's own loop, through the public seams sae-lens documents for outside
    # coordinators, so that `progress=False` silences the bar and no wandb call is made.
    for _ in progress_bar(range(_steps(config)), desc="training SAE", unit="step", disable=not progress):
        trainer.maybe_reset_sparsity()
        trainer.step(next(batches))
        trainer.n_training_steps += 1
    trainer.set_final_sae_metadata()
    return sae
