"""The baseline reward models: `StandardRM`, `GeneralizableRM`, `GenerativeJudge` and
`LogProbPreference` (the package docstring says what each is and how far it is from the
published method), their token helpers and saving, and `fit_baseline`, which fits a method of
the registry (`srlib.baselines.registry`) by name."""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel, TaskType
from torch import Tensor
from transformers import AutoModelForSequenceClassification, PrinterCallback, set_seed
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from trl.data_utils import common_prefix_length
from trl.trainer.reward_trainer import DataCollatorForPreference

from srlib.activations import length_batches
from srlib.backbone import eval_mode, format_text, left_pad
from srlib.baselines.cost import CostMeter, TrainingCost
from srlib.baselines.registry import get_method
from srlib.baselines.settings import (
    GRMSettings,
    JudgeSettings,
    LogProbSettings,
    LoraSettings,
    SettingsClass,
    build_settings,
)
from srlib.cache import check_safetensors, read_json
from srlib.data import prompt_messages, prompt_text
from srlib.errors import ConfigError, DamagedFileError, DataError, one_line
from srlib.evaluate import prompt_ids, sequence_logprobs
from srlib.paths import atomic_path
from srlib.progress import progress_bar, trainer_callback
from srlib.reward import CONFIG_NAME, RewardModel, damaged_remedy, is_saved_reward_model

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


# ----------------------------------------------------------------------------- tokens


def _encode(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """Token ids of an already formatted text (the template holds any BOS), cut from the left
    to the last `max_length` (the end holds the response and the token the classifier reads)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if max_length is None else ids[-max_length:]


def nonempty_pairs(pairs: Sequence, what: str) -> list:
    """The pairs as a list; an empty one is a DataError naming the `what` set."""
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
    candidates = [
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
        tokenizer.bos_token_id,
        *tokenizer.all_special_ids,
    ]
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
    trainer.add_callback(trainer_callback("LoRA fit steps"))
    trainer.train()
    return trainable


def _resolve_backbone(config: dict, backbone):
    """The backbone a saved baseline was trained on: `backbone` if given (checked), else loaded."""
    saved = config["backbone"]
    if backbone is None:
        from srlib.backbone import load_recorded_backbone

        backbone = load_recorded_backbone(saved)
    if backbone.identity != saved["identity"]:
        raise ConfigError(
            f"backbone {backbone.model_id!r} is not the one this {config['rm_class']} was trained on "
            f"(identity {backbone.identity!r} != {saved['identity']!r})"
        )
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

    _signature_columns: list[str] | None  # transformers' Trainer: the columns the model is fed

    def __init__(
        self,
        *args,
        sft_weight: float = 0.0,
        sft_beta: float = 0.1,
        lm_head_weight: Tensor | None = None,
        logit_softcap: float | None = None,
        **kwargs,
    ):
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
        assert self.lm_head_weight is not None  # GRM, the one user of sft_weight, passes its LM head
        inputs["output_hidden_states"] = True
        bt, outputs = super().compute_loss(model, inputs, return_outputs=True)
        logp = chosen_response_logprob(
            outputs.hidden_states[-1],
            inputs["input_ids"],
            inputs["attention_mask"],
            starts,
            self.lm_head_weight,
            self.logit_softcap,
        )
        sft = -F.logsigmoid(self.sft_beta * logp).mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sft_loss"].append(sft.item())
        loss = (1 - self.sft_weight) * bt + self.sft_weight * sft
        return (loss, outputs) if return_outputs else loss


def chosen_response_logprob(
    hidden: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    starts: Tensor,
    lm_head_weight: Tensor,
    logit_softcap: float | None = None,
) -> Tensor:
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


class Baseline(RewardModel):
    """What every baseline adds to `RewardModel`: its settings class, the `fit` that
    `fit_baseline` calls by method name, and what training cost. `cached_fit_baseline` sets
    `from_cache` and `cache_path` on the models it returns."""

    settings_class: ClassVar[type[SettingsClass]]
    cost: TrainingCost | None
    from_cache: bool
    cache_path: Path

    @classmethod
    def fit(
        cls, backbone, train_pairs, val_pairs=None, *, seed: int = 0, progress: bool = True, **overrides: Any
    ) -> Baseline:
        """Fit on `train_pairs` (stopping on `val_pairs`, if given); `overrides` are fields of
        `settings_class`."""
        raise NotImplementedError

    @classmethod
    def lora_wrapped(cls, backbone, settings: Any) -> torch.nn.Module:
        """The backbone wrapped with the adapter (and score head) the trainer would add, for
        counting trainable parameters; only the methods that train have one."""
        raise NotImplementedError


class StandardRM(Baseline):
    """A LoRA reward model: the backbone as a scalar sequence classifier, trained with BT by TRL.

    The score is the classifier head on the final hidden state of the last token of the
    chat-formatted prompt+response text (cut from the left to `max_length` tokens).
    """

    method: ClassVar[str] = "standard"
    settings_class: ClassVar[type[LoraSettings]] = LoraSettings

    def __init__(
        self,
        backbone,
        model: PeftModel,
        pad_id: int,
        settings: LoraSettings,
        *,
        seed: int,
        trainable_parameters: int,
        cost: TrainingCost | None = None,
        val_loss: Sequence[float] = (),
        best_epoch: int | None = None,
    ):
        self.backbone, self.model, self.pad_id = backbone, model.eval(), pad_id
        self.settings, self.seed = settings, seed
        self.trainable_parameters, self.cost = trainable_parameters, cost
        # With validation pairs: the validation loss after each epoch and the 1-based epoch kept
        self.val_loss, self.best_epoch = [float(v) for v in val_loss], best_epoch

    # -- fitting ----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls, backbone, train_pairs, val_pairs=None, *, seed: int = 0, progress: bool = True, **overrides
    ) -> StandardRM:
        """Train on `train_pairs` with TRL's RewardTrainer; with `val_pairs`, keep the epoch of
        lowest validation loss. `overrides` are `LoraSettings` fields (GRMSettings for GRM)."""
        settings = build_settings(cls.settings_class, overrides)
        train_pairs = nonempty_pairs(train_pairs, "training")
        val_pairs = nonempty_pairs(val_pairs, "validation") if val_pairs else None
        with CostMeter() as meter:
            train_rows = cls._rows(backbone.tokenizer, train_pairs, settings.max_length)
            val_rows = cls._rows(backbone.tokenizer, val_pairs, settings.max_length) if val_pairs else None
            pad_id = _pad_id(backbone.tokenizer, train_rows["chosen_ids"] + train_rows["rejected_ids"])
            set_seed(seed)  # the score head's initial weights
            classifier = _sequence_classifier(backbone, pad_id)
            with tempfile.TemporaryDirectory(prefix="srlib-rm-") as out:
                args = RewardConfig(
                    **settings.trainer_kwargs(
                        out, seed, val_pairs is not None, progress, autocast=backbone.autocast_name
                    )
                )
                with _peft_wrapping():
                    trainer = _PairRewardTrainer(
                        model=classifier,
                        args=args,
                        processing_class=_tokenizer_with_pad(backbone.tokenizer, pad_id),
                        train_dataset=Dataset.from_dict(train_rows),
                        eval_dataset=Dataset.from_dict(val_rows) if val_rows else None,
                        data_collator=_ResponseStartCollator(pad_token_id=pad_id),
                        peft_config=settings.lora_config(TaskType.SEQ_CLS, modules_to_save=["score"]),
                        **cls._trainer_extras(backbone, settings),
                    )
                trainable = _train(trainer, progress)
                model = trainer.model
                val_loss, best_epoch = _kept_epoch(trainer.state)
        return cls(
            backbone,
            model,
            pad_id,
            settings,
            seed=seed,
            trainable_parameters=trainable,
            cost=meter.cost(len(train_pairs)),
            val_loss=val_loss,
            best_epoch=best_epoch,
        )

    @classmethod
    def lora_wrapped(cls, backbone, settings: LoraSettings):
        """A fresh scalar classifier on a copy of the backbone, wrapped with the LoRA adapter
        and trainable score head the trainer would add (for counting parameters)."""
        from peft import get_peft_model

        pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
        return get_peft_model(
            _sequence_classifier(backbone, pad_id), settings.lora_config(TaskType.SEQ_CLS, modules_to_save=["score"])
        )

    @classmethod
    def _rows(cls, tokenizer, pairs, max_length: int) -> dict[str, list]:
        """Pre-tokenized pairs in TRL's processed form (cut from the left to `max_length`), plus
        a `length` column for length-grouped batches."""
        chosen = [_encode(tokenizer, format_text(tokenizer, p.prompt, p.chosen), max_length) for p in pairs]
        rejected = [_encode(tokenizer, format_text(tokenizer, p.prompt, p.rejected), max_length) for p in pairs]
        return {
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "length": [max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)],
        }

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
        # the backbone's autocast, as in training; the score head's product in float32
        with self.backbone.reading(), _float32_linear_outputs(self.model, "score"):
            for batch in progress_bar(
                batches, desc=f"{type(self).__name__} scores", unit="batch", disable=not progress, leave=False
            ):
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
        return scores[: len(pairs)], scores[len(pairs) :]

    def num_trainable_parameters(self) -> int:
        """LoRA matrices plus the score head (what the optimiser updated)."""
        return self.trainable_parameters

    # -- saving -------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            **self._config_header(),
            "method": self.method,
            "backbone": self.backbone.record,
            "settings": asdict(self.settings),
            "seed": self.seed,
            "pad_id": self.pad_id,
            "trainable_parameters": self.trainable_parameters,
            "cost": self.cost.as_dict() if self.cost else None,
            "val_loss": self.val_loss,
            "best_epoch": self.best_epoch,
        }

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> None:
        """config.json + the peft adapter (LoRA and score head) in `directory/adapter`."""
        _write(directory, self.config(), self.model, overwrite=overwrite)

    @classmethod
    def _load(cls, directory: Path, config: dict, backbone=None) -> StandardRM:
        backbone = _resolve_backbone(config, backbone)
        model = _load_adapter(_sequence_classifier(backbone, config["pad_id"]), directory)
        return cls(
            backbone,
            model,
            config["pad_id"],
            build_settings(cls.settings_class, config["settings"]),
            seed=config["seed"],
            trainable_parameters=config["trainable_parameters"],
            cost=_saved_cost(config),
            val_loss=config.get("val_loss", ()),
            best_epoch=config.get("best_epoch"),
        )


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
    settings_class: ClassVar[type[LoraSettings]] = GRMSettings

    @classmethod
    def _rows(cls, tokenizer, pairs, max_length: int) -> dict[str, list]:
        rows = super()._rows(tokenizer, pairs, max_length)
        rows["chosen_response_start"] = [
            _response_start(tokenizer, p, len(ids)) for p, ids in zip(pairs, rows["chosen_ids"], strict=True)
        ]
        return rows

    @classmethod
    def _trainer_extras(cls, backbone, settings: GRMSettings) -> dict[str, Any]:
        text_config = backbone.model.config.get_text_config()
        return dict(
            sft_weight=settings.sft_weight,
            sft_beta=settings.sft_beta,
            lm_head_weight=backbone.model.get_output_embeddings().weight.detach(),
            logit_softcap=getattr(text_config, "final_logit_softcapping", None),
        )


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
        raise ConfigError(
            f"the tokenizer splits the verdicts {VERDICT_TOKENS} into several tokens; the judge needs one token each"
        )
    return [i[0] for i in ids]


def _judge_ids(tokenizer, pair, chosen_as_a: bool, max_length: int) -> list[int]:
    """The judging prompt for one pair and order, rendered for the model to answer next,
    cut from the left to `max_length` tokens (the verdict question at the end is kept)."""
    a, b = (pair.chosen, pair.rejected) if chosen_as_a else (pair.rejected, pair.chosen)
    content = JUDGE_TEMPLATE.format(prompt=prompt_text(pair.prompt).strip(), answer_a=a.strip(), answer_b=b.strip())
    return prompt_ids(tokenizer, [{"role": "user", "content": content}])[-max_length:]


@contextlib.contextmanager
def _float32_linear_outputs(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Within the block, every `nn.Linear` of `model` with `name` in its qualified name (peft
    wraps a trained head in copies) computes its product in float32 outside autocast: a score
    or logit rounded to bfloat16's 8 bits would tie two close answers."""

    def float32_product(module, args, output):
        with torch.autocast(args[0].device.type, enabled=False):
            bias = None if module.bias is None else module.bias.float()
            return F.linear(args[0].float(), module.weight.float(), bias)

    hooks = [
        module.register_forward_hook(float32_product)
        for qualified, module in model.named_modules()
        if name in qualified.split(".") and isinstance(module, torch.nn.Linear)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def _next_token_logits(
    model, sequences: list[list[int]], token_ids: list[int], pad_id: int, batch_size: int, progress: bool, desc: str
) -> Tensor:
    """Logits [n, len(token_ids)] of the given tokens right after each sequence.

    Left padding with position ids that follow the attention mask, so a padded row reads as it
    would alone, and only the last position's logits are computed. The blocks run in whatever
    precision the caller's autocast sets, the LM head in float32 (`_float32_linear_outputs`):
    bfloat16 logits, rounded to 8 bits, would make two close verdict tokens tie.
    """
    out = torch.empty(len(sequences), len(token_ids), dtype=torch.float32)
    device = next(model.parameters()).device
    batches = progress_bar(
        length_batches([len(s) for s in sequences], batch_size),
        desc=desc,
        unit="batch",
        disable=not progress,
        leave=False,
    )
    with eval_mode(model), _float32_linear_outputs(model, "lm_head"):
        for batch in batches:
            input_ids, attention = left_pad([sequences[i] for i in batch], pad_id)
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                position_ids=position_ids.to(device),
                logits_to_keep=1,
            ).logits[:, -1]
            out[batch] = logits[:, token_ids].float().cpu()
    return out


class GenerativeJudge(Baseline):
    """A pairwise LLM judge on the backbone: zero-shot, or with a LoRA tuned on the verdicts.

    Not the published JudgeLM or GRAM models (see the module docstring). `score_pairs`
    returns (P(chosen better), 1 − P(chosen better)); a single text has no score.
    """

    settings_class: ClassVar[type[JudgeSettings]] = JudgeSettings

    def __init__(
        self,
        backbone,
        model,
        settings: JudgeSettings,
        *,
        lora: bool,
        seed: int,
        trainable_parameters: int,
        cost: TrainingCost | None = None,
        val_loss: Sequence[float] = (),
        best_epoch: int | None = None,
    ):
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
    def fit(
        cls,
        backbone,
        train_pairs=None,
        val_pairs=None,
        *,
        seed: int = 0,
        lora: bool = False,
        progress: bool = True,
        **overrides,
    ) -> GenerativeJudge:
        """Zero-shot (`lora=False`: nothing is trained, the pairs are not needed) or a LoRA judge
        tuned with TRL's SFTTrainer on the correct verdict token of every training pair in both
        orders; with `val_pairs`, the epoch of lowest validation loss is kept."""
        settings = build_settings(JudgeSettings, overrides)
        verdict_ids = _verdict_ids(backbone.tokenizer)
        if not lora:
            with CostMeter() as meter:
                pass
            return cls(
                backbone, backbone.model, settings, lora=False, seed=seed, trainable_parameters=0, cost=meter.cost(0)
            )
        train_pairs = nonempty_pairs(train_pairs or [], "training")
        val_pairs = nonempty_pairs(val_pairs, "validation") if val_pairs else None
        with CostMeter() as meter:
            rows = _verdict_rows(backbone.tokenizer, train_pairs, verdict_ids, settings.max_length)
            val_rows = (
                _verdict_rows(backbone.tokenizer, val_pairs, verdict_ids, settings.max_length) if val_pairs else None
            )
            tokenizer = backbone.tokenizer
            if tokenizer.pad_token_id is None:
                tokenizer = _tokenizer_with_pad(tokenizer, tokenizer.eos_token_id)
            set_seed(seed)
            with tempfile.TemporaryDirectory(prefix="srlib-judge-") as out:
                args = SFTConfig(
                    **settings.trainer_kwargs(
                        out, seed, val_pairs is not None, progress, autocast=backbone.autocast_name
                    )
                )
                with _peft_wrapping():
                    trainer = SFTTrainer(
                        model=copy.deepcopy(backbone.model),
                        args=args,
                        processing_class=tokenizer,
                        train_dataset=Dataset.from_dict(rows),
                        eval_dataset=Dataset.from_dict(val_rows) if val_rows else None,
                        peft_config=settings.lora_config(TaskType.CAUSAL_LM),
                    )
                trainable = _train(trainer, progress)
                model = trainer.model
                val_loss, best_epoch = _kept_epoch(trainer.state)
        return cls(
            backbone,
            model,
            settings,
            lora=True,
            seed=seed,
            trainable_parameters=trainable,
            cost=meter.cost(len(train_pairs)),
            val_loss=val_loss,
            best_epoch=best_epoch,
        )

    @classmethod
    def lora_wrapped(cls, backbone, settings: JudgeSettings):
        """A copy of the backbone's causal LM wrapped with the LoRA adapter `judge-lora` trains
        (for counting parameters)."""
        from peft import get_peft_model

        return get_peft_model(copy.deepcopy(backbone.model), settings.lora_config(TaskType.CAUSAL_LM))

    def verdict_logits(self, pairs, *, progress: bool = False) -> tuple[Tensor, Tensor]:
        """Logits of ("A", "B") [n, 2] with the chosen answer shown as A, and shown as B."""
        pairs = list(pairs)
        tokenizer, max_length = self.backbone.tokenizer, self.settings.max_length
        sequences = [_judge_ids(tokenizer, p, True, max_length) for p in pairs]
        sequences += [_judge_ids(tokenizer, p, False, max_length) for p in pairs]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with self.backbone.reading():  # the backbone's autocast, as in training
            logits = _next_token_logits(
                self.model,
                sequences,
                self.verdict_ids,
                pad_id,
                self.settings.scoring_batch_size,
                progress,
                "judge verdicts",
            )
        return logits[: len(pairs)], logits[len(pairs) :]

    def score_pairs(self, pairs, *, progress: bool = False) -> tuple[Tensor, Tensor]:
        """(P(chosen is better), 1 − that), averaged over both answer orders."""
        p = verdict_preference(*self.verdict_logits(pairs, progress=progress))
        return p, 1 - p

    def score(self, texts: list[str]) -> Tensor:
        raise ConfigError("a generative judge compares two answers and has no score for one text; use score_pairs")

    def num_trainable_parameters(self) -> int:
        return self.trainable_parameters

    def config(self) -> dict[str, Any]:
        return {
            **self._config_header(),
            "method": self.method,
            "backbone": self.backbone.record,
            "settings": asdict(self.settings),
            "lora": self.lora,
            "seed": self.seed,
            "judge_template": JUDGE_TEMPLATE,
            "trainable_parameters": self.trainable_parameters,
            "cost": self.cost.as_dict() if self.cost else None,
            "val_loss": self.val_loss,
            "best_epoch": self.best_epoch,
        }

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> None:
        """config.json, plus the LoRA adapter in `directory/adapter` for a tuned judge."""
        _write(directory, self.config(), self.model if self.lora else None, overwrite=overwrite)

    @classmethod
    def _load(cls, directory: Path, config: dict, backbone=None) -> GenerativeJudge:
        backbone = _resolve_backbone(config, backbone)
        model = backbone.model
        if config["lora"]:
            model = _load_adapter(copy.deepcopy(backbone.model), directory)
        return cls(
            backbone,
            model,
            build_settings(JudgeSettings, config["settings"]),
            lora=config["lora"],
            seed=config["seed"],
            trainable_parameters=config["trainable_parameters"],
            cost=_saved_cost(config),
            val_loss=config.get("val_loss", ()),
            best_epoch=config.get("best_epoch"),
        )


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


class LogProbPreference(Baseline):
    """The floor: the backbone's mean per-token log-prob of each response given its prompt."""

    method: ClassVar[str] = "logprob"
    settings_class: ClassVar[type[LogProbSettings]] = LogProbSettings

    def __init__(self, backbone, settings: LogProbSettings, cost: TrainingCost | None = None):
        self.backbone, self.settings, self.cost = backbone, settings, cost

    @classmethod
    def fit(
        cls, backbone, train_pairs=None, val_pairs=None, *, seed: int = 0, progress: bool = True, **overrides
    ) -> LogProbPreference:
        """Nothing to train; the pairs and seed are accepted for a uniform interface."""
        settings = build_settings(LogProbSettings, overrides)
        with CostMeter() as meter:
            pass
        return cls(backbone, settings, meter.cost(0))

    def score_pairs(self, pairs, *, progress: bool = False) -> tuple[Tensor, Tensor]:
        """Mean log-prob per response token of the chosen and of the rejected responses."""
        pairs = list(pairs)
        items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        with self.backbone.reading():  # the backbone's autocast, as every reader of it
            scores = sequence_logprobs(
                self.backbone.model,
                self.backbone.tokenizer,
                items,
                normalize=True,
                batch_size=self.settings.scoring_batch_size,
                max_length=self.settings.max_length,
                progress=progress,
                desc="mean log-probs",
            )
        return scores[: len(pairs)], scores[len(pairs) :]

    def score(self, texts: list[str]) -> Tensor:
        raise ConfigError("the log-prob floor scores a response given its prompt; use score_pairs")

    def num_trainable_parameters(self) -> int:
        return 0

    def config(self) -> dict[str, Any]:
        return {
            **self._config_header(),
            "method": self.method,
            "backbone": self.backbone.record,
            "settings": asdict(self.settings),
            "trainable_parameters": 0,
            "cost": self.cost.as_dict() if self.cost else None,
        }

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> None:
        _write(directory, self.config(), overwrite=overwrite)

    @classmethod
    def _load(cls, directory: Path, config: dict, backbone=None) -> LogProbPreference:
        return cls(
            _resolve_backbone(config, backbone),
            build_settings(LogProbSettings, config["settings"]),
            _saved_cost(config),
        )


# ----------------------------------------------------------------------------- factory


def fit_baseline(
    method: str, backbone, train_pairs=None, val_pairs=None, *, seed: int = 0, progress: bool = True, **settings
) -> Baseline:
    """Fit the baseline named `method` (one of `srlib.baselines.METHODS`); `settings` go to its
    class's settings class (`LoraSettings`, `GRMSettings`, `JudgeSettings`, `LogProbSettings`)."""
    spec = get_method(method)
    return spec.model_class.fit(
        backbone, train_pairs, val_pairs, seed=seed, progress=progress, **spec.fit_options, **settings
    )


def trainable_parameters(method: str, backbone, **settings) -> int:
    """How many numbers fitting `method` with these settings trains, without training: the
    model is wrapped with its LoRA adapter (and score head) as the trainer would wrap it, and
    its trainable parameters are counted. 0 for the methods that train nothing."""
    spec = get_method(method)
    resolved = build_settings(spec.model_class.settings_class, settings)
    if not spec.trained:
        return 0
    with _peft_wrapping():
        model = spec.model_class.lora_wrapped(backbone, resolved)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
