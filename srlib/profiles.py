"""Named presets for every stage of the pipeline: `smoke`, `cpu` (the default) and `paper`.

A profile fixes the backbone, the layer the reward model reads, where the SAE comes from and
how large each run is. Notebooks take a papermill parameter `PROFILE` and look the rest up
here, so the book, the command line and the tests agree on what "the cpu profile" means.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from srlib.errors import ConfigError
from srlib.reward_config import HeadConfig, SparseRMConfig

#: The model id that the smoke profile resolves to a tiny random model built in-process.
TINY_MODEL_ID = "srlib/tiny-random-llama"
DEFAULT_PROFILE = "cpu"


@dataclass(frozen=True)
class SAETrainingConfig:
    """How `srlib.sae.train_sae` trains an SAE when no pretrained one is available.

    The architecture is one of sae-lens's trainers (`SAE_ARCHITECTURES`), by default its TopK
    SAE: exactly `k` latents fire per token, so L0 is fixed and there is no sparsity
    coefficient to tune. `batchtopk` keeps `k` latents per token on average over a batch (and is
    saved as a JumpReLU SAE); `jumprelu` and `standard` (ReLU with an L1 penalty) ignore `k` and
    take their sparsity from `sparsity_coefficient` (sae-lens's `l0_coefficient` /
    `l1_coefficient`). The fields after `last_token_share` are chapter 11's training levers; at
    their defaults they leave an SAE's cache key as it was before they existed.
    """

    d_sae: int
    k: int
    training_tokens: int
    batch_size: int = 1024
    lr: float = 8e-4
    lr_end: float = 8e-5
    seed: int = 0
    # Share of training samples taken from the last-token positions that the reward model
    # reads (the rest are all-token activations). A plain all-token SAE reconstructs those
    # positions worse: chapter 1 and `benchmarks/sae_quality.py` print the FVE at those positions.
    last_token_share: float = 0.25
    architecture: str = "topk"
    # sae-lens's l0 (jumprelu) or l1 (standard) coefficient; None: sae-lens's default (1.0).
    sparsity_coefficient: float | None = None
    # A latent silent for 1/dead_window_divisor of the training steps counts as dead (TopK and
    # BatchTopK revive it with sae-lens's AuxK loss); sae-lens's own window is 1,000 steps.
    dead_window_divisor: int = 10


#: sae-lens trainers `SAETrainingConfig.architecture` may name (sae-lens's registry names).
SAE_ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")


@dataclass(frozen=True)
class SAEFamily:
    """Chapter 11's SAEs of graded quality, all at the profile's layer on the profile's SAE
    corpus: (name, training config) in the order the chapter lists them (from deliberately
    weak to the best this machine trains in reasonable time), and the K values at which it
    measures top-K minus random directions. Exactly one config is None: the profile's own SAE,
    which chapter 11 keeps unless both halves of the validation split choose another."""

    variants: tuple[tuple[str, SAETrainingConfig | None], ...]
    ks: tuple[int, ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.variants]
        if len(names) < 2 or len(set(names)) != len(names) or not self.ks:
            raise ConfigError("an SAE family needs at least two variants with distinct names and one K")
        if sum(config is None for _, config in self.variants) != 1:
            raise ConfigError(
                "an SAE family needs exactly one variant whose config is None (the profile's own SAE): "
                "the study keeps it unless both validation halves choose another"
            )

    @property
    def default(self) -> str:
        """The name of the profile's own SAE in the family (the variant whose config is None)."""
        return next(name for name, config in self.variants if config is None)


@dataclass(frozen=True)
class SweepConfig:
    """Chapter 3's validation study (Figure 4): the layers and K values of its grid, the SAE
    each sweep layer trains for itself (None: the sizes of the profile's own SAE), and the data
    set it studies."""

    layers: tuple[int, ...]
    ks: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    sae_tokens: int | None = None
    sae_corpus_tokens: int | None = None
    dataset: str = "truthfulqa"

    def __post_init__(self) -> None:
        if not self.layers or not self.ks:
            raise ConfigError("a sweep needs at least one layer and one K")


@dataclass(frozen=True)
class Profile:
    """Everything that changes between a CI smoke run, a laptop CPU run and the paper's GPU run."""

    name: str
    model_id: str
    layer: int
    # "train" (train with sae-lens on the backbone's activations, cached) or
    # "sae-lens:<release>/<sae_id>" (a pretrained SAE through SAE.from_pretrained).
    sae_source: str
    sae_training: SAETrainingConfig | None
    k: int = 128
    # The token the reward model reads (`srlib.activations.POSITIONS`) and how its head is trained
    # (`HeadConfig`: loss, optimiser, whether it standardises its inputs, ...). Position,
    # `head.standardize`, `layer` and `k` are the settings chapter 3's validation study
    # (`srlib.experiments.validation_study`) compares; a default stays until a study selects another.
    position: str = "last"
    head: HeadConfig = HeadConfig()
    max_length: int = 512
    batch_size: int = 16
    # The dtype the backbone reads hidden states in under `torch.autocast` ("bfloat16" or
    # "float16": matrix products in it, the residual stream in float32), or None: the weights'
    # dtype throughout. `benchmarks/precision.py` measures what it costs and saves.
    autocast: str | None = None
    # Cap on the number of pairs taken from each split (None = all). Keeps smoke runs small.
    max_pairs: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    datasets: tuple[str, ...] = ("truthfulqa", "pku-saferlhf", "hh-harmless")
    description: str = ""
    # Token budget of the SAE corpus drawn from the train splits (None: all their texts);
    # only read when `sae_source` is "train".
    sae_corpus_tokens: int | None = None
    # Chapter 8's data-efficiency curve: the training-set sizes (pairs) SparseRM and DenseRM
    # are fitted at (the whole train split is always added), and the sizes StandardRM joins
    # at (a LoRA fit per size and seed: the expensive part, so fewer on a CPU).
    efficiency_sizes: tuple[int, ...] = (16, 64, 256)
    efficiency_lora_sizes: tuple[int, ...] = (16, 64)
    # Chapter 8's comparison: the training pairs of the LoRA baselines (N of the train split,
    # drawn per seed as the data-efficiency curve draws them), the common test pairs every
    # model is scored on, and the training pairs whose hidden-state extraction is timed.
    baseline_train_pairs: int = 64
    baseline_test_pairs: int = 200
    extraction_sample: int = 16
    # The data sets chapter 8's baselines run on (None: all of `datasets`).
    baseline_datasets: tuple[str, ...] | None = None
    # Chapter 3's validation study (None: the profile's own layer and the default K values).
    sweep: SweepConfig | None = None
    # Chapter 4's accuracy-vs-K probe: the K values it fits.
    probe_ks: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    # Chapter 6's distribution shift: prompts the policy answers, one generated pair each
    # (the paper: 1,000).
    n_generated: int = 1000
    # Torch threads for chapters 7 and 8 (None: torch's default, every core). The smoke
    # profile's tiny tensors run fastest on one.
    threads: int | None = None
    # Why this profile's accuracies may differ from the paper's (chapter 3 says it beside them).
    paper_gap_note: str = ""
    # Chapter 11's family of SAEs of graded quality (None: the chapter has nothing to compare).
    sae_family: SAEFamily | None = None

    @property
    def sweep_config(self) -> SweepConfig:
        """The validation study's grid: `sweep`, or the profile's own layer when it has none."""
        return self.sweep or SweepConfig(layers=(self.layer,))

    def sparserm_config(self, features: str = "projection", *, head: HeadConfig | None = None) -> SparseRMConfig:
        """The reward model this profile fits, as the `SparseRMConfig` that `SparseRM.fit` and
        `DenseRM.fit` take: the profile's layer, K and SAE source (neither for `features="dense"`),
        read position, text length, and `head` (default: the profile's `HeadConfig`). The one
        place a profile's sizes become a reward model's; vary one with `dataclasses.replace`."""
        dense = features == "dense"
        return SparseRMConfig(
            features=features,
            k=None if dense else self.k,
            layer=self.layer,
            sae_source=None if dense else self.sae_source,
            position=self.position,
            max_length=self.max_length,
            head=self.head if head is None else head,
        )

    def replace(self, **changes) -> Profile:
        """A copy with some fields changed (e.g. another layer for a sweep)."""
        return dataclasses.replace(self, **changes)

    def at_layer(self, layer: int | None) -> Profile:
        """The profile moved to `layer` (None: unchanged), with an SAE for that layer.

        A trained SAE (`sae_source="train"`) is trained at the new layer; a Gemma Scope
        source ".../layer_<L>/..." is pointed at the new layer. Any other pretrained SAE
        belongs to one layer: ConfigError, rather than reading another layer through it.
        """
        if layer is None or layer == self.layer:
            return self
        if self.sae_source == "train":
            return self.replace(layer=layer)
        source, count = re.subn(r"/layer_\d+/", f"/layer_{layer}/", self.sae_source)
        if count != 1:
            raise ConfigError(
                f"cannot move the SAE {self.sae_source!r} to layer {layer}: "
                "no '/layer_<L>/' part to change; pass an SAE for that layer"
            )
        return self.replace(layer=layer, sae_source=source)


#: The cpu profile's SAE, and the training tokens of each of chapter 3's sweep SAEs (the same
#: SAE trained shorter): named once because chapter 11's family holds the sweep's SAE at the
#: profile's layer, which must be the very SAE chapter 3 trains (the cache then has it).
_CPU_SAE = SAETrainingConfig(d_sae=16 * 576, k=32, training_tokens=1_200_000)
_CPU_SWEEP_SAE_TOKENS = 300_000

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        model_id=TINY_MODEL_ID,
        layer=2,
        sae_source="train",
        sae_training=SAETrainingConfig(d_sae=256, k=8, training_tokens=20_000, batch_size=256, lr=3e-3, lr_end=3e-4),
        k=8,
        max_length=96,
        batch_size=16,
        max_pairs=48,
        seeds=(0, 1, 2),
        efficiency_sizes=(8, 16),
        efficiency_lora_sizes=(8,),
        baseline_train_pairs=8,
        baseline_test_pairs=24,
        extraction_sample=8,
        baseline_datasets=("truthfulqa",),
        sweep=SweepConfig(layers=(1, 2, 3), ks=(2, 4, 8, 16)),
        probe_ks=(2, 8, 32),
        n_generated=6,
        threads=1,
        sae_family=SAEFamily(
            variants=(
                (
                    "weak: 32 latents, k 2, no read-position rows",
                    SAETrainingConfig(
                        d_sae=32, k=2, training_tokens=2_048, batch_size=256, lr=3e-3, lr_end=3e-4, last_token_share=0.0
                    ),
                ),
                (
                    "BatchTopK, no read-position rows",
                    SAETrainingConfig(
                        d_sae=256,
                        k=8,
                        training_tokens=20_000,
                        batch_size=256,
                        lr=3e-3,
                        lr_end=3e-4,
                        last_token_share=0.0,
                        architecture="batchtopk",
                    ),
                ),
                ("profile default", None),
            ),
            ks=(2, 4, 8),
        ),
        description="Tiny random Llama-style model built in-process; runs in seconds; numbers are meaningless.",
    ),
    "cpu": Profile(
        name="cpu",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        # Layer and K: chapter 3's validation study (TruthfulQA validation, 3 seeds, each layer
        # with its own sweep SAE) selected layer 22, K = 128 with the wide bfloat16 SAEs under its
        # rule (best mean, ties within one standard error go to the smaller K), as with the k = 64
        # float32 ones before them (K = 256 with k = 32); the chapter prints the grid and says
        # whether these defaults still equal its selection. A cold build of dbd0b33 (sweep SAEs
        # trained on states read on two threads, whose bfloat16 bits differ from one thread's)
        # selected K = 256, K = 128's mean just outside one standard error of the best: between
        # the two the choice moves with the SAEs' own bits, so K stays until a selection over SAE
        # seeds (`benchmarks/sae_seeds.py` gives the spread) settles it.
        layer=22,
        sae_source="train",
        # Precision: every pass that reads the backbone (states, SAE training, the baselines' fits
        # and scores) runs under bfloat16 autocast, weights and optimisers in float32: reading and
        # SAE steps about 1.8x faster on one thread (`benchmarks/precision.py`); what it moves in
        # the book is judged against what another SAE seed moves (`benchmarks/sae_seeds.py`).
        autocast="bfloat16",
        # The SAE: chapter 11's study of SAEs of graded quality, run on bfloat16 SAEs, adopted the
        # wide SAE (both halves of the validation pairs chose it). k = 64, which the float32 run of
        # the same study adopted, and k = 32 before it stay in the family: which of them wins has
        # moved with the SAEs' own training, so the chapter says which it adopts on every run.
        # Wide trains slower than k = 64 (chapter 11's training table gives both times).
        sae_training=_CPU_SAE,
        k=128,
        # The SAE corpus: at most 400k tokens of the train splits, shared equally across the
        # data sets (~4,200 texts; extraction is the slow part on a CPU).
        sae_corpus_tokens=400_000,
        # Each sweep layer's SAE: fewer training tokens than the profile's own SAE, the same corpus cap.
        sweep=SweepConfig(layers=(8, 15, 22), sae_tokens=_CPU_SWEEP_SAE_TOKENS, sae_corpus_tokens=400_000),
        # Chapter 11: eight SAEs at layer 22 on the profile's corpus, weakest first. "profile
        # default" is the profile's own SAE (cached by chapter 1); the others are trained by the
        # chapter (minutes each on 2 cores), except chapter 3's layer-22 sweep SAE, which chapter 3
        # has cached (the profile's SAE trained for the sweep's shorter budget). Training length
        # is shown by one pair at a fixed recipe (that sweep SAE against the profile's own); the
        # 1.2M-token variants differ from "k 32" in one lever each (architecture; read-position
        # rows with their dead window; k; the default's width). A second length pair (read-heavy
        # at 600k) was dropped: it showed no lever the others do not, and cost a cold build about
        # 140 s (106 s of SAE training and 34 s of head fits, from two builds' reports).
        sae_family=SAEFamily(
            variants=(
                (
                    "weak: 576 latents, k 8, 150k tokens, no read-position rows",
                    SAETrainingConfig(d_sae=576, k=8, training_tokens=150_000, last_token_share=0.0),
                ),
                (
                    "all tokens only: 300k tokens, no read-position rows",
                    SAETrainingConfig(d_sae=8 * 576, k=32, training_tokens=300_000, last_token_share=0.0),
                ),
                (
                    "chapter 3's sweep SAE: 9,216 latents, 300k tokens",
                    dataclasses.replace(_CPU_SAE, training_tokens=_CPU_SWEEP_SAE_TOKENS),
                ),
                (
                    "k 32: 1.2M tokens (the default before k 64)",
                    SAETrainingConfig(d_sae=8 * 576, k=32, training_tokens=1_200_000),
                ),
                (
                    "BatchTopK: 1.2M tokens",
                    SAETrainingConfig(d_sae=8 * 576, k=32, training_tokens=1_200_000, architecture="batchtopk"),
                ),
                (
                    "read-heavy: 1.2M tokens, half read-position rows, dead window 1/20",
                    SAETrainingConfig(
                        d_sae=8 * 576, k=32, training_tokens=1_200_000, last_token_share=0.5, dead_window_divisor=20
                    ),
                ),
                (
                    "k 64: 1.2M tokens (the default before wide)",
                    SAETrainingConfig(d_sae=8 * 576, k=64, training_tokens=1_200_000),
                ),
                ("profile default: wide, 9,216 latents, 1.2M tokens", None),
            ),
            # the profile's own K (128, chapter 3's choice) among them: the chapter says whether
            # top-K beats random there
            ks=(16, 64, 128, 256),
        ),
        n_generated=96,
        paper_gap_note="A 135M-parameter model knows far less than Gemma-2-9B-it, and its SAE was trained here on a "
        "corpus of a few hundred thousand tokens where Gemma Scope's saw billions, so lower accuracy "
        "is expected; what carries over is the method, and chapters 4–6 compare its variants on equal "
        "terms.",
        max_length=512,
        batch_size=16,
        max_pairs=None,
        seeds=(0, 1, 2),
        description="SmolLM2-135M-Instruct (30 layers, d=576), layer 22, an SAE trained here "
        "with sae-lens; the real book on a laptop CPU.",
    ),
    "paper": Profile(
        name="paper",
        model_id="google/gemma-2-2b-it",
        layer=13,
        sae_source="sae-lens:gemma-scope-2b-pt-res-canonical/layer_13/width_16k/canonical",
        sae_training=None,
        k=128,
        max_length=1024,
        batch_size=8,
        max_pairs=None,
        seeds=(0, 1, 2, 3, 4),
        efficiency_sizes=(16, 64, 256, 1000),
        efficiency_lora_sizes=(16, 64, 256, 1000),
        sweep=SweepConfig(layers=(6, 13, 20)),
        paper_gap_note="The paper profile runs Gemma-2-2B-it, not the 9B model these paper numbers are for.",
        description="Gemma-2-2B-it, layer 13, Gemma Scope SAE; needs a GPU and hub access.",
    ),
}


#: Chapter 7's alignment loop per profile: the `srlib.alignment.AlignmentConfig` fields that
#: differ from its defaults (`AlignmentConfig.for_profile` reads them from here).
ALIGNMENT: dict[str, dict] = {
    # Seconds on the tiny random model; the numbers mean nothing.
    "smoke": dict(
        model_id=TINY_MODEL_ID,
        n_prompts=6,
        rounds=2,
        n_shots=1,
        max_new_tokens=6,
        generation_batch_size=8,
        epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        max_length=96,
        max_val=6,
        max_test=6,
    ),
    # SmolLM2-135M-Instruct on 2 CPU cores: a few dozen prompts, two rounds, capped evaluation.
    "cpu": dict(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        n_prompts=24,
        rounds=2,
        max_new_tokens=32,
        learning_rate=2e-3,
        max_length=512,
        max_val=50,
        max_test=200,
        # DPO steps of 8 pairs, taken one pair per pass and accumulated: the same step as the whole
        # batch, with the memory of one pair and no padding to the batch's longest prompt (a batch
        # of 8 peaked at 14-19 GB, enough to kill a chapter beside another one).
        # `benchmarks/precision.py --policy --policy-batch-size --policy-accumulation` measures both.
        batch_size=1,
        gradient_accumulation_steps=8,
        # The policy generates, trains (TRL's bf16 mixed precision) and is scored under bfloat16
        # autocast, weights and optimiser float32: 1.5-1.6x on every stage in one process
        # (`benchmarks/precision.py --policy` measures time, memory and verdicts both ways); a
        # whole chapter run against its float32 one moved no verdict of Table 1.
        autocast="bfloat16",
    ),
    # The paper's loop on Gemma-2-2B-it (a GPU and hub access): every generation prompt, 5 rounds.
    "paper": dict(
        model_id="google/gemma-2-2b-it",
        n_prompts=None,
        rounds=5,
        max_new_tokens=128,
        learning_rate=5e-5,
        max_length=1024,
        max_val=None,
        max_test=None,
    ),
}


def get_profile(name: str) -> Profile:
    """Return the named profile, or raise ValueError listing the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
