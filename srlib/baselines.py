"""The reward models SparseRM is compared with (the paper's Figure 3), on the same backbone.

Every baseline has the interface of `srlib.reward.RewardModel` (`score_pairs`, `score`,
`save_pretrained`, `RewardModel.from_pretrained`, `num_trainable_parameters`) and records
what training cost in `.cost` (a `TrainingCost`). Build one with `fit_baseline(method, ...)`
or `<Class>.fit(backbone, train_pairs, val_pairs=None, *, seed=0, ...)`.

What each one is, and how far it is from the published method:

* `StandardRM` (method ``standard``; Stiennon et al. 2020): the backbone as a sequence
  classifier with a scalar head, trained with the Bradley-Terry loss by TRL's
  `RewardTrainer`. As the SparseRM paper trains its baselines, with LoRA: rank 8 on the
  attention q/v projections, the head trainable in full (peft ``modules_to_save``). The
  published model fine-tunes the whole network; LoRA is the paper's (and our) choice.
* `GeneralizableRM` (``generalizable``; Yang et al. 2024, GRM): StandardRM plus GRM's
  text-generation regulariser on the chosen responses, read through the SAME hidden states:
  loss = (1 − α)·BT + α·(−log σ(β · log π(y_chosen | x))), with log π the summed log-prob
  of the chosen response tokens under the backbone's own (frozen) LM head applied to the
  final hidden states of the LoRA'd backbone. α = 0.01, β = 0.1 and the reference-free
  "SFT" form are GRM's published defaults. Not as published: their reward head is an MLP
  (one hidden layer of 1,024 units) and their LoRA is rank 32 on q/k/v/o; here the head and
  LoRA are StandardRM's, so the two baselines differ only by the regulariser.
* `GenerativeJudge` (``judge``, ``judge-lora``): the JudgeLM / GRAM family, NOT their
  published models (JudgeLM and GRAM are separately fine-tuned judge LLMs with their own
  prompts and training data). The backbone is asked which of two answers is better
  (`JUDGE_TEMPLATE`); the verdict is read from the next-token logits of "A" and "B" and
  averaged over both orders to cancel position bias. ``judge`` is zero-shot; ``judge-lora``
  tunes a LoRA (same shape as above) with TRL's `SFTTrainer` on the correct verdict token of
  every training pair, in both orders; given validation pairs it keeps the epoch of lowest
  validation loss and records it (`best_epoch`, `val_loss`), as the two RMs above do. Its
  `score_pairs` returns s_chosen = P(chosen is better) and s_rejected = 1 − s_chosen: a
  pairwise judge has no score for one response.
* `LogProbPreference` (``logprob``): no reward model at all, the floor: each response is
  scored by the backbone's mean per-token log-probability of it given the prompt
  (`srlib.evaluate`'s reading of the response tokens).

Cost: `TrainingCost.seconds` is the wall time of training (data preparation included, final
scoring excluded); memory is the process's resident set size (RSS) sampled by psutil every
20 ms while training (tracemalloc misses torch's allocations; getrusage's ru_maxrss is a peak
over the whole process life, so a second run in one process would report the first's peak).
`measure_cost` puts any other training (SparseRM's head, say) under the same meter.

Caching: `cached_fit_baseline` fits a baseline once and saves it under
`cache_dir("baselines", key)`, the key hashing the backbone's identity, the method, its
settings (defaults filled in), the seed and the texts and ids of the pairs it learns from; a
later call loads it, training cost included. `cached_score_pairs` keeps its scores of a pair
set beside it, with the scoring time, so a rebuilt book neither trains nor scores again.
`baseline_trials` runs methods × seeds through both and returns one row per fit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import psutil
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, PeftModel, TaskType
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PrinterCallback, set_seed
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from trl.data_utils import common_prefix_length
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from trl.trainer.reward_trainer import DataCollatorForPreference

from srlib.activations import length_batches
from srlib.backbone import format_text, left_pad
from srlib.data import prompt_messages, prompt_text
from srlib.cache import check_safetensors, read_json, warn_recomputing
from srlib.errors import ConfigError, DamagedFileError, DataError, one_line
from srlib.evaluate import mean_sd, pair_outcomes, prompt_ids, sequence_logprobs
from srlib.paths import atomic_path, cache_dir
from srlib.reward import CONFIG_NAME, RewardModel, damaged_remedy, is_saved_reward_model, pair_accuracy

METHODS = ("standard", "generalizable", "judge", "judge-lora", "logprob")
ADAPTER_DIR = "adapter"

#: The judging prompt (one user turn). Answers are shown as A and B; the model answers next.
JUDGE_TEMPLATE = (
    "Read the conversation and the two answers below, then decide which answer is better: "
    "more truthful, more helpful and more harmless.\n\n"
    "[Conversation]\n{prompt}\n\n"
    "[Answer A]\n{answer_a}\n\n"
    "[Answer B]\n{answer_b}\n\n"
    "Which answer is better? Reply with one letter: A or B."
)
VERDICT_TOKENS = ("A", "B")


# ----------------------------------------------------------------------------- cost


@dataclass
class TrainingCost:
    """What training a reward model cost (see the module docstring for how it is measured)."""

    seconds: float
    peak_rss_mb: float
    rss_increase_mb: float  # peak RSS while training minus RSS when training began
    n_train_pairs: int
    memory_method: str = "psutil RSS sampled every 20 ms"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _CostMeter:
    """Context manager: wall time and peak RSS of the block, sampled in a background thread."""

    interval = 0.02

    def __enter__(self) -> "_CostMeter":
        self._process = psutil.Process()
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def cost(self, n_train_pairs: int) -> TrainingCost:
        mb = 1024 * 1024
        return TrainingCost(seconds=round(self.seconds, 3), peak_rss_mb=round(self.peak_rss / mb, 1),
                            rss_increase_mb=round((self.peak_rss - self.start_rss) / mb, 1),
                            n_train_pairs=n_train_pairs)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LoraSettings:
    """How the LoRA baselines train. Defaults: sensible LoRA settings for a small backbone,
    not tuned against SparseRM. `max_steps > 0` caps the optimiser steps (smoke runs)."""

    epochs: float = 1.0
    learning_rate: float = 1e-4
    batch_size: int = 8  # pairs per optimiser step (times gradient_accumulation_steps)
    gradient_accumulation_steps: int = 1
    max_length: int = 512  # tokens kept per text, from the END (the start is cut)
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    warmup_ratio: float = 0.03
    max_steps: int = -1
    scoring_batch_size: int = 16

    def check(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "lora_r", "scoring_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and math.isfinite(self.epochs)):
            raise ConfigError(f"learning_rate and epochs must be finite numbers, got {self.learning_rate}, "
                              f"{self.epochs}")
        if not self.learning_rate > 0 or not self.epochs > 0:
            raise ConfigError(f"learning_rate and epochs must be > 0, got {self.learning_rate}, {self.epochs}")

    def lora_config(self, task_type: TaskType, modules_to_save: list[str] | None = None) -> LoraConfig:
        # Dropout 0: TRL's trainers switch every dropout off anyway (disable_dropout=True).
        return LoraConfig(task_type=task_type, r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=0.0,
                          target_modules=list(self.target_modules), modules_to_save=modules_to_save)

    def trainer_kwargs(self, output_dir: str, seed: int, has_val: bool, progress: bool) -> dict[str, Any]:
        """Arguments shared by RewardConfig and SFTConfig: float32, no checkpointing; the GPU if any."""
        per_epoch = "epoch" if has_val else "no"
        return dict(
            output_dir=output_dir, num_train_epochs=self.epochs, max_steps=self.max_steps,
            learning_rate=self.learning_rate, lr_scheduler_type="linear", warmup_steps=self.warmup_ratio,
            weight_decay=0.0, per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.scoring_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            eval_strategy=per_epoch, save_strategy=per_epoch, save_only_model=True, save_total_limit=1,
            load_best_model_at_end=has_val, prediction_loss_only=True,
            seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, activation_checkpointing=False,
            report_to="none", logging_steps=10, disable_tqdm=not progress, dataloader_num_workers=0,
            train_sampling_strategy="group_by_length",  # shuffled batches of similar length: less padding
            max_length=None,  # texts are cut from the left beforehand; TRL would drop long ones
        )


@dataclass(frozen=True)
class GRMSettings(LoraSettings):
    """LoraSettings plus GRM's regulariser: weight α (`sft_weight`) and β (`sft_beta`)."""

    sft_weight: float = 0.01
    sft_beta: float = 0.1

    def check(self) -> None:
        super().check()
        if not 0 < self.sft_weight < 1:
            raise ConfigError(f"sft_weight (GRM's alpha) must be in (0, 1), got {self.sft_weight}")


def _settings(cls: type, kwargs: dict[str, Any]):
    """Build a settings dataclass, turning an unknown or badly typed keyword into a ConfigError."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    if "target_modules" in kwargs:
        kwargs = {**kwargs, "target_modules": tuple(kwargs["target_modules"])}
    settings = cls(**kwargs)
    settings.check()
    return settings


# ----------------------------------------------------------------------------- tokens


def _encode(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """Token ids of an already formatted text (the template holds any BOS), cut from the left
    to the last `max_length` (the end holds the response and the token the classifier reads)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if max_length is None else ids[-max_length:]


def _check_pairs(pairs: Sequence, what: str) -> list:
    pairs = list(pairs)
    if not pairs:
        raise DataError(f"the {what} set is empty")
    return pairs


def _pad_id(tokenizer, sequences: Sequence[list[int]]) -> int:
    """A pad id that no sequence ends with.

    transformers' sequence classifiers score the rightmost token that is not the pad id, so
    a pad id equal to the true last token (SmolLM2 pads with its end-of-turn token) would make
    them read an earlier token. Prefer the tokenizer's pad, then EOS, UNK, BOS, other specials.
    """
    last = {s[-1] for s in sequences if s}
    candidates = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
                  tokenizer.bos_token_id, *tokenizer.all_special_ids]
    for candidate in candidates:
        if candidate is not None and candidate not in last:
            return int(candidate)
    raise ConfigError("every special token ends some text; no safe pad token for the reward classifier")


def _tokenizer_with_pad(tokenizer, pad_id: int):
    """A copy of the tokenizer whose pad token is `pad_id` (the backbone's own stays untouched)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    return tokenizer


def _right_pad(batch: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        input_ids[row, : len(s)] = torch.tensor(s)
        attention[row, : len(s)] = 1
    return input_ids, attention


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """Around code that wraps a model with a LoRA adapter (peft's `get_peft_model` directly
    or inside a TRL trainer, `PeftModel.from_pretrained`): peft still asks transformers for `is_gradient_checkpointing`,
    deprecated in transformers 5, and that notice means nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _train(trainer, progress: bool) -> int:
    """Run a TRL trainer (quietly unless `progress`); return its trainable parameter count."""
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return trainable


def _backbone_record(backbone) -> dict[str, str]:
    return {"model_id": backbone.model_id, "identity": backbone.identity, "weights": backbone.weights}


def _resolve_backbone(config: dict, backbone):
    """The backbone a saved baseline was trained on: `backbone` if given (checked), else loaded."""
    saved = config["backbone"]
    if backbone is None:
        from srlib.backbone import load_backbone

        backbone = load_backbone(saved["model_id"])
    if backbone.identity != saved["identity"]:
        raise ConfigError(f"backbone {backbone.model_id!r} is not the one this {config['rm_class']} was trained on "
                          f"(identity {backbone.identity!r} != {saved['identity']!r})")
    return backbone


def _saved_cost(config: dict) -> TrainingCost | None:
    return TrainingCost(**config["cost"]) if config.get("cost") else None


def _write(directory: str | Path, config: dict, model=None, *, overwrite: bool = True) -> None:
    """Save config.json (and a peft adapter, if any) atomically, as `RewardModel.save_pretrained` says."""
    with atomic_path(directory, is_dir=True, overwrite=overwrite, is_ours=is_saved_reward_model) as tmp:
        if model is not None:
            model.save_pretrained(tmp / ADAPTER_DIR)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------- StandardRM, GRM


@dataclass
class _ResponseStartCollator(DataCollatorForPreference):
    """TRL's preference collator, also passing where each chosen response starts (for GRM)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if "chosen_response_start" in examples[0]:
            output["chosen_response_start"] = torch.tensor([e["chosen_response_start"] for e in examples])
        return output


class _PairRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with two additions.

    * Batches grouped by a precomputed ``length`` column (TRL drops unknown columns before the
      sampler could read them, so the column is declared here).
    * With ``sft_weight`` α > 0, GRM's loss (1 − α)·BT + α·(−log σ(β·log π(y_w|x))): TRL's
      own BT loss (and its metrics) from `RewardTrainer.compute_loss`, plus the summed
      log-prob of the chosen response tokens, read with the frozen LM head `lm_head_weight`
      from the final (normed) hidden states of the same forward pass.
    """

    def __init__(self, *args, sft_weight: float = 0.0, sft_beta: float = 0.1,
                 lm_head_weight: Tensor | None = None, logit_softcap: float | None = None, **kwargs):
        self.sft_weight, self.sft_beta = sft_weight, sft_beta
        self.lm_head_weight, self.logit_softcap = lm_head_weight, logit_softcap
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "length", "chosen_response_start"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        starts = inputs.pop("chosen_response_start", None)
        if self.sft_weight == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["output_hidden_states"] = True
        bt, outputs = super().compute_loss(model, inputs, return_outputs=True)
        logp = chosen_response_logprob(outputs.hidden_states[-1], inputs["input_ids"], inputs["attention_mask"],
                                       starts, self.lm_head_weight, self.logit_softcap)
        sft = -F.logsigmoid(self.sft_beta * logp).mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sft_loss"].append(sft.item())
        loss = (1 - self.sft_weight) * bt + self.sft_weight * sft
        return (loss, outputs) if return_outputs else loss


def chosen_response_logprob(hidden: Tensor, input_ids: Tensor, attention_mask: Tensor, starts: Tensor,
                            lm_head_weight: Tensor, logit_softcap: float | None = None) -> Tensor:
    """Summed log-prob of each chosen response's tokens, from final hidden states [2n, T, d].

    Rows 0..n-1 are the chosen texts (TRL's collator puts them first), right-padded; the
    response of row i is its tokens from `starts[i]` to its last real token. Position t
    predicts token t + 1, so only the positions before response tokens need the LM head.
    """
    n = starts.shape[0]
    positions = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
    lengths = attention_mask[:n].sum(-1)
    first = (starts.to(input_ids.device) - 1).clamp(min=0)
    mask = (positions[None] >= first[:, None]) & (positions[None] <= lengths[:, None] - 2)
    logits = F.linear(hidden[:n, :-1][mask], lm_head_weight.to(hidden.device, hidden.dtype))
    if logit_softcap:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    token_logp = logits.log_softmax(-1).gather(-1, input_ids[:n, 1:][mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(n, device=input_ids.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(n, dtype=token_logp.dtype, device=token_logp.device).index_add(0, rows, token_logp)


class StandardRM(RewardModel):
    """A LoRA reward model: the backbone as a scalar sequence classifier, trained with BT by TRL.

    The score is the classifier head on the final hidden state of the last token of the
    chat-formatted prompt+response text (cut from the left to `max_length` tokens).
    """

    method: ClassVar[str] = "standard"
    settings_class: ClassVar[type] = LoraSettings

    def __init__(self, backbone, model: PeftModel, pad_id: int, settings: LoraSettings, *, seed: int,
                 trainable_parameters: int, cost: TrainingCost | None = None,
                 val_loss: Sequence[float] = (), best_epoch: int | None = None):
        self.backbone, self.model, self.pad_id = backbone, model.eval(), pad_id
        self.settings, self.seed = settings, seed
        self.trainable_parameters, self.cost = trainable_parameters, cost
        # With validation pairs: the validation loss after each epoch and the 1-based epoch kept
        self.val_loss, self.best_epoch = [float(v) for v in val_loss], best_epoch

    # -- fitting ----------------------------------------------------------------------------

    @classmethod
    def fit(cls, backbone, train_pairs, val_pairs=None, *, seed: int = 0, progress: bool = True,
            **settings) -> "StandardRM":
        """Train on `train_pairs` with TRL's RewardTrainer; with `val_pairs`, keep the epoch of
        lowest validation loss. `settings` are `LoraSettings` fields (GRMSettings for GRM)."""
        settings = _settings(cls.settings_class, settings)
        train_pairs = _check_pairs(train_pairs, "training")
        val_pairs = _check_pairs(val_pairs, "validation") if val_pairs else None
        with _CostMeter() as meter:
            train_rows = cls._rows(backbone.tokenizer, train_pairs, settings.max_length)
            val_rows = cls._rows(backbone.tokenizer, val_pairs, settings.max_length) if val_pairs else None
            pad_id = _pad_id(backbone.tokenizer, train_rows["chosen_ids"] + train_rows["rejected_ids"])
            set_seed(seed)  # the score head's initial weights
            classifier = _sequence_classifier(backbone, pad_id)
            with tempfile.TemporaryDirectory(prefix="srlib-rm-") as out:
                args = RewardConfig(**settings.trainer_kwargs(out, seed, val_pairs is not None, progress))
                with _peft_wrapping():
                    trainer = _PairRewardTrainer(
                        model=classifier, args=args, processing_class=_tokenizer_with_pad(backbone.tokenizer, pad_id),
                        train_dataset=Dataset.from_dict(train_rows),
                        eval_dataset=Dataset.from_dict(val_rows) if val_rows else None,
                        data_collator=_ResponseStartCollator(pad_token_id=pad_id),
                        peft_config=settings.lora_config(TaskType.SEQ_CLS, modules_to_save=["score"]),
                        **cls._trainer_extras(backbone, settings),
                    )
                trainable = _train(trainer, progress)
                model = trainer.model
                val_loss, best_epoch = _kept_epoch(trainer.state)
        return cls(backbone, model, pad_id, settings, seed=seed, trainable_parameters=trainable,
                   cost=meter.cost(len(train_pairs)), val_loss=val_loss, best_epoch=best_epoch)

    @classmethod
    def _rows(cls, tokenizer, pairs, max_length: int) -> dict[str, list]:
        """Pre-tokenized pairs in TRL's processed form (cut from the left to `max_length`), plus
        a `length` column for length-grouped batches."""
        chosen = [_encode(tokenizer, format_text(tokenizer, p.prompt, p.chosen), max_length) for p in pairs]
        rejected = [_encode(tokenizer, format_text(tokenizer, p.prompt, p.rejected), max_length) for p in pairs]
        return {"chosen_ids": chosen, "rejected_ids": rejected,
                "length": [max(len(c), len(r)) for c, r in zip(chosen, rejected)]}

    @classmethod
    def _trainer_extras(cls, backbone, settings) -> dict[str, Any]:
        return {}

    # -- scoring ------------------------------------------------------------------------------

    @torch.no_grad()
    def _score_ids(self, sequences: list[list[int]], progress: bool) -> Tensor:
        bad = [i for i, s in enumerate(sequences) if not s or s[-1] == self.pad_id]
        if bad:
            raise ConfigError(f"text {bad[0]} is empty or ends with the pad token, which the classifier skips")
        out = torch.empty(len(sequences), dtype=torch.float32)
        device = next(self.model.parameters()).device
        batches = length_batches([len(s) for s in sequences], self.settings.scoring_batch_size)
        for batch in tqdm(batches, desc=f"{type(self).__name__} scores", disable=not progress, leave=False):
            input_ids, attention = _right_pad([sequences[i] for i in batch], self.pad_id)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            out[batch] = logits[:, 0].float().cpu()
        return out

    def score(self, texts: list[str], *, progress: bool = False) -> Tensor:
        """Scores [n] for chat-formatted prompt+response texts (`srlib.backbone.format_text`)."""
        tokenizer, max_length = self.backbone.tokenizer, self.settings.max_length
        return self._score_ids([_encode(tokenizer, t, max_length) for t in texts], progress)

    def score_pairs(self, pairs, *, progress: bool = False) -> tuple[Tensor, Tensor]:
        """(s_chosen, s_rejected), 1-D float32, for a list of `PreferencePair`s."""
        pairs = list(pairs)
        tokenizer = self.backbone.tokenizer
        texts = [format_text(tokenizer, p.prompt, p.chosen) for p in pairs]
        texts += [format_text(tokenizer, p.prompt, p.rejected) for p in pairs]
        scores = self.score(texts, progress=progress)
        return scores[: len(pairs)], scores[len(pairs):]

    def num_trainable_parameters(self) -> int:
        """LoRA matrices plus the score head (what the optimiser updated)."""
        return self.trainable_parameters

    # -- saving -------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {**self._config_header(), "method": self.method, "backbone": _backbone_record(self.backbone),
                "settings": asdict(self.settings), "seed": self.seed, "pad_id": self.pad_id,
                "trainable_parameters": self.trainable_parameters,
                "cost": self.cost.as_dict() if self.cost else None,
                "val_loss": self.val_loss, "best_epoch": self.best_epoch}

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> None:
        """config.json + the peft adapter (LoRA and score head) in `directory/adapter`."""
        _write(directory, self.config(), self.model, overwrite=overwrite)

    @classmethod
    def _load(cls, directory: Path, config: dict, backbone=None) -> "StandardRM":
        backbone = _resolve_backbone(config, backbone)
        model = _load_adapter(_sequence_classifier(backbone, config["pad_id"]), directory)
        return cls(backbone, model, config["pad_id"], _settings(cls.settings_class, config["settings"]),
                   seed=config["seed"], trainable_parameters=config["trainable_parameters"],
                   cost=_saved_cost(config), val_loss=config.get("val_loss", ()),
                   best_epoch=config.get("best_epoch"))


def _kept_epoch(state) -> tuple[list[float], int | None]:
    """From a finished trainer's state: the validation loss after each epoch and the 1-based
    epoch whose weights `load_best_model_at_end` restored (([], None) without validation).

    The kept weights are those of the checkpoint `state.best_model_checkpoint` names
    ("checkpoint-<step>"); the epoch is the evaluation logged at that step.
    """
    evals = [entry for entry in state.log_history if "eval_loss" in entry]
    if not evals or state.best_model_checkpoint is None:
        return [entry["eval_loss"] for entry in evals], None
    step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
    kept = [i for i, entry in enumerate(evals) if entry["step"] == step]
    return [entry["eval_loss"] for entry in evals], kept[0] + 1 if kept else None


def _load_adapter(model, directory: Path) -> PeftModel:
    """`model` with the peft adapter saved in `directory/adapter`. Safetensors only (peft would
    fall back to a pickled .bin); a missing or damaged adapter raises one line naming it."""
    adapter, remedy = directory / ADAPTER_DIR, damaged_remedy(directory)
    read_json(adapter / "adapter_config.json", remedy)
    check_safetensors(adapter / "adapter_model.safetensors", remedy)
    try:
        with _peft_wrapping():
            return PeftModel.from_pretrained(model, adapter)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as error:
        raise DamagedFileError(f"{adapter}: cannot load the LoRA adapter ({one_line(str(error))}); {remedy}") from None


def _sequence_classifier(backbone, pad_id: int):
    """A fresh scalar sequence classifier holding a copy of the backbone's transformer weights.

    The score head is newly initialised (from the global seed); the backbone is not changed.
    """
    config = copy.deepcopy(backbone.model.config)
    config.num_labels = 1
    config.get_text_config().pad_token_id = pad_id
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    classifier.base_model.load_state_dict(backbone.model.base_model.state_dict())
    return classifier.to(backbone.device)


class GeneralizableRM(StandardRM):
    """StandardRM with GRM's text-generation regulariser (Yang et al. 2024); see the module
    docstring for what is and is not the published method."""

    method: ClassVar[str] = "generalizable"
    settings_class: ClassVar[type] = GRMSettings

    @classmethod
    def _rows(cls, tokenizer, pairs, max_length: int) -> dict[str, list]:
        rows = super()._rows(tokenizer, pairs, max_length)
        rows["chosen_response_start"] = [_response_start(tokenizer, p, len(ids))
                                         for p, ids in zip(pairs, rows["chosen_ids"])]
        return rows

    @classmethod
    def _trainer_extras(cls, backbone, settings: GRMSettings) -> dict[str, Any]:
        text_config = backbone.model.config.get_text_config()
        return dict(sft_weight=settings.sft_weight, sft_beta=settings.sft_beta,
                    lm_head_weight=backbone.model.get_output_embeddings().weight.detach(),
                    logit_softcap=getattr(text_config, "final_logit_softcapping", None))


def _response_start(tokenizer, pair, n_kept: int) -> int:
    """Where the chosen response's tokens begin in its formatted ids cut to their last `n_kept`.

    The response starts after the longest common token prefix of the full text and the prompt
    rendered alone with its generation prompt (`srlib.evaluate.prompt_ids`), as TRL's trainers
    read completions; the template's end-of-turn tokens therefore count as response.
    """
    full = _encode(tokenizer, format_text(tokenizer, pair.prompt, pair.chosen))
    start = common_prefix_length(prompt_ids(tokenizer, prompt_messages(pair.prompt)), full)
    return max(0, start - (len(full) - n_kept))


# ----------------------------------------------------------------------------- generative judge


@dataclass(frozen=True)
class JudgeSettings(LoraSettings):
    """LoraSettings for the judge (the LoRA fields matter only for ``judge-lora``); its prompts
    hold two answers, hence the longer default `max_length`."""

    max_length: int = 1024


def verdict_preference(logits_chosen_as_a: Tensor, logits_chosen_as_b: Tensor) -> Tensor:
    """P(the chosen answer is better) from the verdict logits of both orders, averaged.

    Each argument is [n, 2]: the logits (or log-probs) of the tokens "A" and "B", with the
    chosen answer shown as A (first argument) or as B (second). In one order the judge's
    probability that A is better is the softmax over the two verdicts only, σ(l_A − l_B);
    averaging P(chosen | shown as A) = σ(l_A − l_B) and P(chosen | shown as B) = σ(l_B − l_A)
    of the swapped prompt cancels a judge's preference for a position.
    """
    first = torch.sigmoid(logits_chosen_as_a[:, 0] - logits_chosen_as_a[:, 1])
    second = torch.sigmoid(logits_chosen_as_b[:, 1] - logits_chosen_as_b[:, 0])
    return (first + second) / 2


def _verdict_ids(tokenizer) -> list[int]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in VERDICT_TOKENS]
    if any(len(i) != 1 for i in ids):
        raise ConfigError(f"the tokenizer splits the verdicts {VERDICT_TOKENS} into several tokens; "
                          "the judge needs one token each")
    return [i[0] for i in ids]


def _judge_ids(tokenizer, pair, chosen_as_a: bool, max_length: int) -> list[int]:
    """The judging prompt for one pair and order, rendered for the model to answer next,
    cut from the left to `max_length` tokens (the verdict question at the end is kept)."""
    a, b = (pair.chosen, pair.rejected) if chosen_as_a else (pair.rejected, pair.chosen)
    content = JUDGE_TEMPLATE.format(prompt=prompt_text(pair.prompt).strip(), answer_a=a.strip(), answer_b=b.strip())
    return prompt_ids(tokenizer, [{"role": "user", "content": content}])[-max_length:]


@torch.no_grad()
def _next_token_logits(model, sequences: list[list[int]], token_ids: list[int], pad_id: int,
                       batch_size: int, progress: bool, desc: str) -> Tensor:
    """Logits [n, len(token_ids)] of the given tokens right after each sequence.

    Left padding with position ids that follow the attention mask, so a padded row reads as it
    would alone, and only the last position's logits are computed.
    """
    out = torch.empty(len(sequences), len(token_ids), dtype=torch.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for batch in tqdm(length_batches([len(s) for s in sequences], batch_size), desc=desc, disable=not progress, leave=False):
        input_ids, attention = left_pad([sequences[i] for i in batch], pad_id)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                       position_ids=position_ids.to(device), logits_to_keep=1).logits[:, -1]
        out[batch] = logits[:, token_ids].float().cpu()
    model.train(was_training)
    return out


class GenerativeJudge(RewardModel):
    """A pairwise LLM judge on the backbone: zero-shot, or with a LoRA tuned on the verdicts.

    Not the published JudgeLM or GRAM models (see the module docstring). `score_pairs`
    returns (P(chosen better), 1 − P(chosen better)); a single text has no score.
    """

    def __init__(self, backbone, model, settings: JudgeSettings, *, lora: bool, seed: int,
                 trainable_parameters: int, cost: TrainingCost | None = None,
                 val_loss: Sequence[float] = (), best_epoch: int | None = None):
        self.backbone, self.model, self.settings = backbone, model.eval(), settings
        self.lora, self.seed = lora, seed
        self.trainable_parameters, self.cost = trainable_parameters, cost
        # A LoRA judge tuned with validation pairs: the validation loss after each epoch and the
        # 1-based epoch kept (`_kept_epoch`, as StandardRM)
        self.val_loss, self.best_epoch = [float(v) for v in val_loss], best_epoch
        self.verdict_ids = _verdict_ids(backbone.tokenizer)

    @property
    def method(self) -> str:
        return "judge-lora" if self.lora else "judge"

    @classmethod
    def fit(cls, backbone, train_pairs=None, val_pairs=None, *, seed: int = 0, lora: bool = False,
            progress: bool = True, **settings) -> "GenerativeJudge":
        """Zero-shot (`lora=False`: nothing is trained, the pairs are not needed) or a LoRA judge
        tuned with TRL's SFTTrainer on the correct verdict token of every training pair in both
        orders; with `val_pairs`, the epoch of lowest validation loss is kept."""
        settings = _settings(JudgeSettings, settings)
        verdict_ids = _verdict_ids(backbone.tokenizer)
        if not lora:
            with _CostMeter() as meter:
                pass
            return cls(backbone, backbone.model, settings, lora=False, seed=seed, trainable_parameters=0,
                       cost=meter.cost(0))
        train_pairs = _check_pairs(train_pairs or [], "training")
        val_pairs = _check_pairs(val_pairs, "validation") if val_pairs else None
        with _CostMeter() as meter:
            rows = _verdict_rows(backbone.tokenizer, train_pairs, verdict_ids, settings.max_length)
            val_rows = _verdict_rows(backbone.tokenizer, val_pairs, verdict_ids, settings.max_length) if val_pairs else None
            tokenizer = backbone.tokenizer
            if tokenizer.pad_token_id is None:
                tokenizer = _tokenizer_with_pad(tokenizer, tokenizer.eos_token_id)
            set_seed(seed)
            with tempfile.TemporaryDirectory(prefix="srlib-judge-") as out:
                args = SFTConfig(**settings.trainer_kwargs(out, seed, val_pairs is not None, progress))
                with _peft_wrapping():
                    trainer = SFTTrainer(
                        model=copy.deepcopy(backbone.model), args=args, processing_class=tokenizer,
                        train_dataset=Dataset.from_dict(rows),
                        eval_dataset=Dataset.from_dict(val_rows) if val_rows else None,
                        peft_config=settings.lora_config(TaskType.CAUSAL_LM),
                    )
                trainable = _train(trainer, progress)
                model = trainer.model
                val_loss, best_epoch = _kept_epoch(trainer.state)
        return cls(backbone, model, settings, lora=True, seed=seed, trainable_parameters=trainable,
                   cost=meter.cost(len(train_pairs)), val_loss=val_loss, best_epoch=best_epoch)

    def verdict_logits(self, pairs, *, progress: bool = False) -> tuple[Tensor, Tensor]:
        """Logits of ("A", "B") [n, 2] with the chosen answer shown as A, and shown as B."""
        pairs = list(pairs)
        tokenizer, max_length = self.backbone.tokenizer, self.settings.max_length
        sequences = [_judge_ids(tokenizer, p, True, max_length) for p in pairs]
        sequences += [_judge_ids(tokenizer, p, False, max_length) for p in pairs]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        logits = _next_token_logits(self.model, sequences, self.verdict_ids, pad_id,
                                    self.settings.scoring_batch_size, progress, "judge verdicts")
        return logits[: len(pairs)], logits[len(pairs):]

    def score_pairs(self, pairs, *, progress: bool = False) -> tuple[Tensor, Tensor]:
        """(P(chosen is better), 1 − that), averaged over both answer orders."""
        p = verdict_preference(*self.verdict_logits(pairs, progress=progress))
        return p, 1 - p

    def score(self, texts: list[str]) -> Tensor:
        raise ConfigError("a generative judge compares two answers and has no score for one text; "
                          "use score_pairs")

    def num_trainable_parameters(self) -> int:
        return self.trainable_parameters

    def config(self) -> dict[str, Any]:
        return {**self._config_header(), "method": self.method, "backbone": _backbone_record(self.backbone),
                "settings": asdict(self.settings), "lora": self.lora, "seed": self.seed,
                "judge_template": JUDGE_TEMPLATE, "trainable_parameters": self.trainable_parameters,
                "cost": self.cost.as_dict() if self.cost else None,
                "val_loss": self.val_loss, "best_epoch": self.best_epoch}

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> None:
        """config.json, plus the LoRA adapter in `directory/adapter` for a tuned judge."""
        _write(directory, self.config(), self.model if self.lora else None, overwrite=overwrite)

    @classmethod
    def _load(cls, directory: Path, config: dict, backbone=None) -> "GenerativeJudge":
        backbone = _resolve_backbone(config, backbone)
        model = backbone.model
        if config["lora"]:
            model = _load_adapter(copy.deepcopy(backbone.model), directory)
        return cls(backbone, model, _settings(JudgeSettings, config["settings"]), lora=config["lora"],
                   seed=config["seed"], trainable_parameters=config["trainable_parameters"],
                   cost=_saved_cost(config), val_loss=config.get("val_loss", ()),
                   best_epoch=config.get("best_epoch"))


def _verdict_rows(tokenizer, pairs, verdict_ids: list[int], max_length: int) -> dict[str, list]:
    """SFT examples, two per pair (chosen shown as A, then as B): the judging prompt and the
    correct verdict token, with the loss on that token only (labels −100 elsewhere)."""
    input_ids, labels = [], []
    for pair in pairs:
        for chosen_as_a, verdict in ((True, verdict_ids[0]), (False, verdict_ids[1])):
            prompt = _judge_ids(tokenizer, pair, chosen_as_a, max_length - 1)
            input_ids.append(prompt + [verdict])
            labels.append([-100] * len(prompt) + [verdict])
    return {"input_ids": input_ids, "labels": labels}


# ----------------------------------------------------------------------------- log-prob floor


@dataclass(frozen=True)
class LogProbSettings:
    """How the log-prob floor reads responses (nothing is trained)."""

    max_length: int = 512
    scoring_batch_size: int = 16

    def check(self) -> None:
        if self.max_length < 2 or self.scoring_batch_size < 1:
            raise ConfigError(f"max_length must be >= 2 and scoring_batch_size >= 1, got "
                              f"{self.max_length}, {self.scoring_batch_size}")


class LogProbPreference(RewardModel):
    """The floor: the backbone's mean per-token log-prob of each response given its prompt."""

    method: ClassVar[str] = "logprob"

    def __init__(self, backbone, settings: LogProbSettings, cost: TrainingCost | None = None):
        self.backbone, self.settings, self.cost = backbone, settings, cost

    @classmethod
    def fit(cls, backbone, train_pairs=None, val_pairs=None, *, seed: int = 0, progress: bool = True,
            **settings) -> "LogProbPreference":
        """Nothing to train; the pairs and seed are accepted for a uniform interface."""
        settings = _settings(LogProbSettings, settings)
        with _CostMeter() as meter:
            pass
        return cls(backbone, settings, meter.cost(0))

    def score_pairs(self, pairs, *, progress: bool = False) -> tuple[Tensor, Tensor]:
        """Mean log-prob per response token of the chosen and of the rejected responses."""
        pairs = list(pairs)
        items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        scores = sequence_logprobs(self.backbone.model, self.backbone.tokenizer, items, normalize=True,
                                    batch_size=self.settings.scoring_batch_size,
                                    max_length=self.settings.max_length, progress=progress,
                                    desc="mean log-probs")
        return scores[: len(pairs)], scores[len(pairs):]

    def score(self, texts: list[str]) -> Tensor:
        raise ConfigError("the log-prob floor scores a response given its prompt; use score_pairs")

    def num_trainable_parameters(self) -> int:
        return 0

    def config(self) -> dict[str, Any]:
        return {**self._config_header(), "method": self.method, "backbone": _backbone_record(self.backbone),
                "settings": asdict(self.settings), "trainable_parameters": 0,
                "cost": self.cost.as_dict() if self.cost else None}

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> None:
        _write(directory, self.config(), overwrite=overwrite)

    @classmethod
    def _load(cls, directory: Path, config: dict, backbone=None) -> "LogProbPreference":
        return cls(_resolve_backbone(config, backbone), _settings(LogProbSettings, config["settings"]),
                   _saved_cost(config))


# ----------------------------------------------------------------------------- factory


def fit_baseline(method: str, backbone, train_pairs=None, val_pairs=None, *, seed: int = 0,
                 progress: bool = True, **settings) -> RewardModel:
    """Fit the baseline named `method` (one of `METHODS`); `settings` go to its settings class
    (`LoraSettings`, `GRMSettings`, `JudgeSettings`, `LogProbSettings`)."""
    kwargs = dict(seed=seed, progress=progress, **settings)
    if method == "standard":
        return StandardRM.fit(backbone, train_pairs, val_pairs, **kwargs)
    if method == "generalizable":
        return GeneralizableRM.fit(backbone, train_pairs, val_pairs, **kwargs)
    if method in ("judge", "judge-lora"):
        return GenerativeJudge.fit(backbone, train_pairs, val_pairs, lora=method == "judge-lora", **kwargs)
    if method == "logprob":
        return LogProbPreference.fit(backbone, train_pairs, val_pairs, **kwargs)
    raise ConfigError(f"unknown baseline method {method!r}; choose one of: {', '.join(METHODS)}")


def measure_cost(fn: Callable[..., Any], *args, n_train_pairs: int, **kwargs) -> tuple[Any, TrainingCost]:
    """Call `fn(*args, **kwargs)` under the meter the baselines are costed with (wall time,
    psutil peak RSS); return its result and the `TrainingCost`. Lets any other reward model
    (SparseRM, DenseRM) be timed and weighed exactly as the baselines are."""
    with _CostMeter() as meter:
        result = fn(*args, **kwargs)
    return result, meter.cost(n_train_pairs)


def trainable_parameters(method: str, backbone, **settings) -> int:
    """How many numbers fitting `method` with these settings trains, without training: the
    model is wrapped with its LoRA adapter (and score head) as the trainer would wrap it, and
    its trainable parameters are counted. 0 for the zero-shot judge and the log-prob floor."""
    if method not in SETTINGS_CLASSES:
        raise ConfigError(f"unknown baseline method {method!r}; choose one of: {', '.join(METHODS)}")
    resolved = _settings(SETTINGS_CLASSES[method], settings)
    if method not in TRAINED_METHODS:
        return 0
    from peft import get_peft_model

    with _peft_wrapping():
        if method == "judge-lora":
            model = get_peft_model(copy.deepcopy(backbone.model), resolved.lora_config(TaskType.CAUSAL_LM))
        else:
            pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
            model = get_peft_model(_sequence_classifier(backbone, pad_id),
                                   resolved.lora_config(TaskType.SEQ_CLS, modules_to_save=["score"]))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- cache and trials

#: Bump when a change to the baselines makes earlier cached fits stale.
CACHE_VERSION = 1
SETTINGS_CLASSES: dict[str, type] = {"standard": LoraSettings, "generalizable": GRMSettings,
                                     "judge": JudgeSettings, "judge-lora": JudgeSettings,
                                     "logprob": LogProbSettings}
#: The methods that learn from the training pairs (the others ignore pairs and seed).
TRAINED_METHODS = ("standard", "generalizable", "judge-lora")
#: How the book names each method.
METHOD_LABELS = {"standard": "StandardRM (LoRA)", "generalizable": "GeneralizableRM (LoRA)",
                 "judge": "zero-shot judge", "judge-lora": "LoRA judge", "logprob": "log-prob floor"}
SCORES_DIR = "scores"
#: The columns of `baseline_trials`' table.
TRIAL_COLUMNS = ("dataset", "variant", "method", "seed", "test_accuracy", "trainable_parameters", "fit_seconds",
                 "peak_rss_mb", "rss_increase_mb", "pairs_per_second", "n_train_pairs", "n_test_pairs", "from_cache",
                 "best_epoch", "outcomes")


def pairs_digest(pairs: Sequence | None) -> str | None:
    """A hash of a pair list: ids and texts, in order (None for no pairs). Two lists hash
    alike only if every pair has the same id, prompt, chosen and rejected text."""
    if not pairs:
        return None
    digest = hashlib.sha256()
    for pair in pairs:
        for part in (pair.pair_id, pair.prompt, pair.chosen, pair.rejected):
            digest.update((part if isinstance(part, str) else json.dumps(part)).encode())  # a conversation prompt
            digest.update(b"\x00")
    return digest.hexdigest()


def baseline_key(method: str, backbone, train_pairs: Sequence | None = None, val_pairs: Sequence | None = None,
                 *, seed: int = 0, **settings) -> str:
    """The cache key of one baseline fit: "<method>-<hash>".

    The hash covers the backbone's identity, the method, its settings with the defaults filled
    in (so leaving a setting out and passing its default give one key), a cache version and,
    for the methods that train (`TRAINED_METHODS`), the seed and the training and validation
    pairs (`pairs_digest`). The zero-shot judge and the log-prob floor learn nothing, so their
    key ignores pairs and seed.
    """
    if method not in SETTINGS_CLASSES:
        raise ConfigError(f"unknown baseline method {method!r}; choose one of: {', '.join(METHODS)}")
    resolved = _settings(SETTINGS_CLASSES[method], settings)
    # 1 and 1.0 epochs are one fit: numbers of float fields are hashed as floats
    canonical = {f.name: float(getattr(resolved, f.name)) if f.type == "float" else getattr(resolved, f.name)
                 for f in dataclasses.fields(resolved)}
    record: dict[str, Any] = {"version": CACHE_VERSION, "method": method, "backbone": backbone.identity,
                              "settings": canonical}
    if method in TRAINED_METHODS:
        record.update(seed=seed, train=pairs_digest(train_pairs), val=pairs_digest(val_pairs))
    text = json.dumps(record, sort_keys=True)
    return f"{method}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def cached_fit_baseline(method: str, backbone, train_pairs: Sequence | None = None,
                        val_pairs: Sequence | None = None, *, seed: int = 0, progress: bool = True,
                        **settings) -> RewardModel:
    """`fit_baseline`, but only once: the fitted model is saved (atomically) under
    `cache_dir("baselines", baseline_key(...))` and a later call with the same backbone, method,
    settings, seed and pairs loads it instead of training.

    The returned model has `cache_path` (its folder, for `cached_score_pairs`) and
    `from_cache` (True when loaded); its `.cost` is the cost measured when it was trained.
    """
    directory = cache_dir("baselines") / baseline_key(method, backbone, train_pairs, val_pairs, seed=seed,
                                                      **settings)
    rm = None
    if (directory / CONFIG_NAME).is_file():
        try:
            rm = RewardModel.from_pretrained(directory, backbone=backbone)
            rm.from_cache = True
        except DamagedFileError as error:
            warn_recomputing(directory, error)
            shutil.rmtree(directory)  # srlib's own cache entry: the refit below writes it anew
    if rm is None:
        rm = fit_baseline(method, backbone, train_pairs, val_pairs, seed=seed, progress=progress, **settings)
        rm.save_pretrained(directory)
        rm.from_cache = False
    rm.cache_path = directory
    return rm


@dataclass
class PairScores:
    """A reward model's scores of a pair set and how long computing them took."""

    chosen: Tensor
    rejected: Tensor
    seconds: float  # wall time of score_pairs when the scores were computed (not when loaded)
    from_cache: bool = False

    @property
    def accuracy(self) -> float:
        return pair_accuracy(self.chosen, self.rejected)

    @property
    def pairs_per_second(self) -> float:
        return len(self.chosen) / self.seconds if self.seconds > 0 else float("inf")


def _scores_path(directory: str | Path, pairs: Sequence) -> Path:
    return Path(directory) / SCORES_DIR / f"{pairs_digest(pairs)}.safetensors"


def cached_score_pairs(rm: RewardModel, pairs: Sequence, *, progress: bool = False) -> PairScores:
    """`rm.score_pairs(pairs)`, timed, kept in the model's cache folder (`scores/<pairs_digest>`)
    so a second call with the same pairs loads the scores and the time first measured.
    `rm` must come from `cached_fit_baseline`."""
    directory = getattr(rm, "cache_path", None)
    if directory is None:
        raise ConfigError("cached_score_pairs needs a reward model from cached_fit_baseline (it has no cache_path)")
    pairs = _check_pairs(pairs, "scoring")
    path = _scores_path(directory, pairs)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                seconds = float(f.metadata()["seconds"])
                return PairScores(f.get_tensor("chosen"), f.get_tensor("rejected"), seconds, from_cache=True)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
            warn_recomputing(path, error)  # damaged: scored again below and rewritten
    started = time.perf_counter()
    chosen, rejected = rm.score_pairs(pairs, progress=progress)
    scores = PairScores(chosen.float(), rejected.float(), time.perf_counter() - started)
    with atomic_path(path) as tmp:
        save_file({"chosen": scores.chosen.contiguous(), "rejected": scores.rejected.contiguous()}, str(tmp),
                  metadata={"seconds": repr(scores.seconds), "n_pairs": str(len(pairs))})
    return scores


def baseline_settings(max_length: int, *, epochs: float = 1.0, learning_rate: float = 2e-4,
                      batch_size: int = 1) -> dict[str, dict[str, Any]]:
    """The settings keywords of every method as the book runs them (chapter 8 and
    `benchmarks/rm_cost.py` share them, so both hit the same cache entries): the LoRA methods
    with the given epochs, learning rate and batch size, texts cut to `max_length` tokens and
    the judges' two-answer prompts to twice that."""
    lora = dict(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, max_length=max_length)
    return {"standard": lora, "generalizable": dict(lora), "judge-lora": {**lora, "max_length": 2 * max_length},
            "judge": {"max_length": 2 * max_length}, "logprob": {"max_length": max_length}}


def baseline_trials(backbone, dataset: str, train_pairs: Sequence, val_pairs: Sequence | None,
                    test_pairs: Sequence, methods: Sequence[str], seeds: Sequence[int], *,
                    settings: Mapping[str, dict] | None = None, only_cached: bool = False, progress: bool = False):
    """Fit (or load) every baseline in `methods` with every seed and score `test_pairs`, all
    through the cache; a DataFrame with one row per fit.

    Columns: dataset, variant (`METHOD_LABELS`), method, seed, test_accuracy (fraction),
    trainable_parameters, fit_seconds, peak_rss_mb, rss_increase_mb, pairs_per_second (test
    scoring), n_train_pairs, n_test_pairs, from_cache, best_epoch (the epoch a LoRA model kept
    on the validation split; None without one), outcomes (per test pair, 1 / 0 / ½ for a tie,
    `srlib.evaluate.pair_outcomes`, for `compare_paired`). `settings` maps a method to its settings
    keywords. The untrained methods (zero-shot judge, log-prob floor) do not depend on the
    seed or the pairs: they run once, with the first seed. With `only_cached`, nothing is
    trained or scored: fits whose model and test scores are not both cached are left out.
    """
    import pandas as pd

    if not seeds:
        raise ConfigError("baseline_trials needs at least one seed")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown baseline method {unknown[0]!r}; choose from: {', '.join(METHODS)}")
    rows = []
    for method in methods:
        trained = method in TRAINED_METHODS
        for seed in seeds if trained else seeds[:1]:
            fit = dict(method=method, backbone=backbone, train_pairs=train_pairs if trained else None,
                       val_pairs=val_pairs if trained else None, seed=seed, **dict((settings or {}).get(method, {})))
            if only_cached:
                directory = cache_dir("baselines") / baseline_key(**fit)
                if not _scores_path(directory, test_pairs).is_file() or not (directory / CONFIG_NAME).is_file():
                    continue
            rm = cached_fit_baseline(progress=progress, **fit)
            scores = cached_score_pairs(rm, test_pairs, progress=progress)
            rows.append({"dataset": dataset, "variant": METHOD_LABELS[method], "method": method, "seed": seed,
                         "test_accuracy": scores.accuracy, "trainable_parameters": rm.num_trainable_parameters(),
                         "fit_seconds": rm.cost.seconds, "peak_rss_mb": rm.cost.peak_rss_mb,
                         "rss_increase_mb": rm.cost.rss_increase_mb, "pairs_per_second": scores.pairs_per_second,
                         "n_train_pairs": rm.cost.n_train_pairs, "n_test_pairs": len(test_pairs),
                         "from_cache": rm.from_cache, "best_epoch": getattr(rm, "best_epoch", None),
                         "outcomes": pair_outcomes(scores.chosen, scores.rejected)})
    return pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))


def comparison_table(trials, backbone_parameters: int):
    """Figure 3 as a table: one row per (dataset, variant) of `trials`, in their order.

    `trials`: rows of `baseline_trials` and of SparseRM/DenseRM fits with the same columns
    (dataset, variant, seed, test_accuracy, trainable_parameters, fit_seconds, peak_rss_mb,
    rss_increase_mb, pairs_per_second, n_train_pairs); optional columns
    `full_test_accuracy` (accuracy on the whole test split) and `fit_seconds_with_extraction`
    (training time counting the hidden states' extraction; where it is missing or NaN the
    method read the texts itself, so its `fit_seconds` already counts everything).
    Accuracies are "mean ± sd" in % over seeds and count a tie as wrong (`pair_accuracy`);
    where trials carry per-pair `outcomes` (1, 0, ½ for a tie) and any pair is tied, a
    "ties (%)" column gives the tied share beside them. Times, memory and speed are means.
    """
    import numpy as np
    import pandas as pd

    from srlib.experiments import DATASET_LABELS

    data = trials.copy()
    if "fit_seconds_with_extraction" not in data:
        data["fit_seconds_with_extraction"] = float("nan")
    data["fit_seconds_with_extraction"] = data["fit_seconds_with_extraction"].fillna(data["fit_seconds"])

    def label(values) -> str:
        values = values.dropna() * 100
        return mean_sd(values.mean(), values.std())

    rows = []
    for (dataset, variant), group in data.groupby(["dataset", "variant"], sort=False):
        params = int(group["trainable_parameters"].iloc[0])
        row = {"data set": DATASET_LABELS.get(dataset, dataset), "method": variant,
               "test accuracy (%)": label(group["test_accuracy"])}
        if "full_test_accuracy" in group:
            row["full test split (%)"] = label(group["full_test_accuracy"])
        if "outcomes" in group:
            outcomes = [np.asarray(o) for o in group["outcomes"] if o is not None and not np.isscalar(o)]
            row["ties (%)"] = 100 * float(np.mean([np.mean(o == 0.5) for o in outcomes])) if outcomes else 0.0
        row.update({"seeds": int(group["seed"].nunique()), "train pairs": int(group["n_train_pairs"].iloc[0]),
                    "trainable parameters": params, "% of backbone": 100 * params / backbone_parameters,
                    "train time (s)": group["fit_seconds"].mean(),
                    "train time with extraction (s)": group["fit_seconds_with_extraction"].mean(),
                    "RSS increase (MB)": group["rss_increase_mb"].mean(), "peak RSS (MB)": group["peak_rss_mb"].mean(),
                    "scoring pairs/s": group["pairs_per_second"].mean()})
        rows.append(row)
    table = pd.DataFrame(rows)
    if "ties (%)" in table and not (table["ties (%)"] > 0).any():
        table = table.drop(columns="ties (%)")
    return table
