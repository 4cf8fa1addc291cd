"""The settings of each baseline: frozen dataclasses checked on creation, so a typo or a
value out of range is one line naming the setting before anything trains."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from peft import LoraConfig, TaskType

from srlib.errors import ConfigError


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
            raise ConfigError(
                f"learning_rate and epochs must be finite numbers, got {self.learning_rate}, {self.epochs}"
            )
        if not self.learning_rate > 0 or not self.epochs > 0:
            raise ConfigError(f"learning_rate and epochs must be > 0, got {self.learning_rate}, {self.epochs}")

    def lora_config(self, task_type: TaskType, modules_to_save: list[str] | None = None) -> LoraConfig:
        # Dropout 0: TRL's trainers switch every dropout off anyway (disable_dropout=True).
        return LoraConfig(
            task_type=task_type,
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(self.target_modules),
            modules_to_save=modules_to_save,
        )

    def trainer_kwargs(
        self, output_dir: str, seed: int, has_val: bool, progress: bool, *, autocast: str | None = None
    ) -> dict[str, Any]:
        """Arguments shared by RewardConfig and SFTConfig: float32 weights, no checkpointing, the
        GPU if any; with the backbone's `autocast` ("bfloat16", `Backbone.autocast_name`) the
        Trainer's mixed precision in that dtype, so a baseline trains in the precision its
        backbone reads states in (weights and the adapter's optimiser stay float32)."""
        per_epoch = "epoch" if has_val else "no"
        return dict(
            output_dir=output_dir,
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=self.warmup_ratio,
            weight_decay=0.0,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.scoring_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            eval_strategy=per_epoch,
            save_strategy=per_epoch,
            save_only_model=True,
            save_total_limit=1,
            load_best_model_at_end=has_val,
            prediction_loss_only=True,
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=autocast == "bfloat16",
            fp16=autocast == "float16",
            activation_checkpointing=False,
            report_to="none",
            logging_steps=10,
            disable_tqdm=not progress,
            dataloader_num_workers=0,
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


@dataclass(frozen=True)
class JudgeSettings(LoraSettings):
    """LoraSettings for the judge (the LoRA fields matter only for ``judge-lora``); its prompts
    hold two answers, hence the longer default `max_length`."""

    max_length: int = 1024


@dataclass(frozen=True)
class LogProbSettings:
    """How the log-prob floor reads responses (nothing is trained)."""

    max_length: int = 512
    scoring_batch_size: int = 16

    def check(self) -> None:
        if self.max_length < 2 or self.scoring_batch_size < 1:
            raise ConfigError(
                f"max_length must be >= 2 and scoring_batch_size >= 1, got {self.max_length}, {self.scoring_batch_size}"
            )


class SettingsClass(Protocol):
    """What every baseline settings class is: a dataclass whose `check` raises a ConfigError
    naming a value out of range."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def check(self) -> None: ...


Settings = TypeVar("Settings", bound=SettingsClass)


def build_settings(cls: type[Settings], kwargs: dict[str, Any]) -> Settings:
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
