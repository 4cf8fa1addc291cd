"""What a reward model is and how its head is trained, as two frozen, validated dataclasses.

`HeadConfig` holds every setting of `srlib.reward.fit_head` (loss, γ, optimiser, early stopping,
head shape, input standardisation, seed); `SparseRMConfig` holds what a fitted SparseRM reads
(feature kind, K, layer, SAE source, read position, text length) and its `HeadConfig`. Both check
their values when built, so a misspelt loss or a negative learning rate fails where it is written,
in one line naming the field and the allowed values, not deep inside a training loop. A study that
varies one setting copies the profile's config with `dataclasses.replace`.

`to_dict` / `from_dict` are the JSON form a saved reward model's config.json stores; the form
carries a ``config_version`` and `from_dict` refuses an unknown version or an unknown key with
one line naming the file and the remedy. This module imports no torch (`srlib.profiles` holds
the default `HeadConfig`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from srlib.errors import ConfigError

#: The losses `srlib.reward.get_loss` knows: eq. 13's margin loss, Bradley-Terry, BCE (Table 3).
LOSS_NAMES = ("margin", "bt", "bce")
#: The hidden activations `srlib.reward.RewardHead` knows.
ACTIVATION_NAMES = ("relu", "gelu", "tanh")
#: The version of the dict form `to_dict` writes and `from_dict` reads.
CONFIG_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed; it must be an integer >= {minimum}")


def _check_float(owner: str, name: str, value: Any, *, positive: bool) -> None:
    bound = "> 0" if positive else ">= 0"
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or (value <= 0 if positive else value < 0)
    ):
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed; it must be a finite number {bound}")


def _check_keys(cls: type, keys: Any, where: str) -> None:
    """Every key must be a field of `cls`: an unknown one (a typo) is named with the closest field."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}unknown {cls.__name__} field {key!r}{hint}; fix or remove it (fields: {', '.join(names)})"
            )


_Config = TypeVar("_Config")


def _typo_checked(cls: type[_Config]) -> type[_Config]:
    """`cls` whose constructor refuses an unknown keyword with `_check_keys`'s one line (a
    `ConfigError`, like every other bad setting) instead of Python's TypeError."""
    init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_keys(cls, kwargs, "")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _fields_from_dict(cls: type, data: Any, source: str) -> dict[str, Any]:
    """The field values of `cls` in `data` (its `to_dict` form), after checking the version and
    that every key is a field: an unknown one is named with the closest field."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the {cls.__name__} entry is not a JSON object; save the model again with this srlib"
        )
    version = data.get("config_version")
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"{source}: {cls.__name__} config_version {version!r} is not one this srlib reads "
            f"({CONFIG_VERSION}); upgrade srlib, or save the model again with this one"
        )
    _check_keys(cls, [key for key in data if key != "config_version"], f"{source}: ")
    return {key: value for key, value in data.items() if key != "config_version"}


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    """`cls(**values)`, its one-line `ConfigError` prefixed with `source` (the file it was read from)."""
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


@_typo_checked
@dataclass(frozen=True)
class HeadConfig:
    """How the reward head is built and trained (`srlib.reward.fit_head`); the defaults are the
    book's (see `srlib.reward`'s module text for why each).

    loss: "margin" (eq. 13), "bt" or "bce"; gamma: the margin loss's γ (> 0; unused by the others);
    lr, weight_decay: Adam's; epochs: at most this many; batch_size: pairs per step; patience:
    epochs without a better validation accuracy before stopping; hidden, activation: the MLP's
    hidden width and nonlinearity; standardize: scale each input by its training mean and std;
    seed: initial weights and minibatch order.
    """

    loss: str = "margin"
    gamma: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 50
    batch_size: int = 64
    patience: int = 10
    hidden: int = 512
    activation: str = "relu"
    standardize: bool = True
    seed: int = 0

    OWNER: ClassVar[str] = "HeadConfig"

    def __post_init__(self) -> None:
        _check_choice(self.OWNER, "loss", self.loss, LOSS_NAMES)
        _check_choice(self.OWNER, "activation", self.activation, ACTIVATION_NAMES)
        _check_float(self.OWNER, "gamma", self.gamma, positive=True)
        _check_float(self.OWNER, "lr", self.lr, positive=True)
        _check_float(self.OWNER, "weight_decay", self.weight_decay, positive=False)
        for name in ("epochs", "batch_size", "patience", "hidden"):
            _check_int(self.OWNER, name, getattr(self, name), 1)
        _check_int(self.OWNER, "seed", self.seed, 0)
        if not isinstance(self.standardize, bool):
            raise ConfigError(f"{self.OWNER}.standardize={self.standardize!r} is not allowed; it must be True or False")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``config_version`` and every field."""
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "the config") -> HeadConfig:
        """The config `to_dict` wrote (a missing field takes its default); `source` names the file
        in the one-line error for an unknown version or key."""
        return _build(cls, _fields_from_dict(cls, data, source), source)

    def describe(self) -> str:
        """One line for the book: every setting, the loss first."""
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


@_typo_checked
@dataclass(frozen=True)
class SparseRMConfig:
    """What a fitted SparseRM (or DenseRM, `features="dense"`) reads and how its head was trained.

    features: "projection" (the paper's), "latents", "random" (Table 2) or "dense" (DenseRM);
    k: directions per side (None for dense, and only there); layer: the hidden layer read (None:
    not set; `SparseRM.fit` needs one); sae_source: where the SAE came from
    (`srlib.profiles.Profile.sae_source`; None for dense);
    position: the token read (`srlib.activations.POSITIONS`); max_length: tokens per text.
    """

    features: str = "projection"
    k: int | None = 128
    layer: int | None = None
    sae_source: str | None = None
    position: str = "last"
    max_length: int = 512
    head: HeadConfig = field(default_factory=HeadConfig)

    OWNER: ClassVar[str] = "SparseRMConfig"

    def __post_init__(self) -> None:
        from srlib.activations import POSITIONS
        from srlib.reward import FEATURE_MAPS

        _check_choice(self.OWNER, "features", self.features, tuple(FEATURE_MAPS))
        _check_choice(self.OWNER, "position", self.position, POSITIONS)
        if self.features != "dense":
            _check_int(self.OWNER, "k", self.k, 1)
        else:  # a fitted DenseRM has neither, and its `rm_config` must give back the config it was fitted with
            for name in ("k", "sae_source"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{self.OWNER}.{name}={getattr(self, name)!r} is not allowed with features='dense' "
                        f"(DenseRM reads no SAE); set {name}=None"
                    )
        if self.layer is not None:
            _check_int(self.OWNER, "layer", self.layer, 0)
        _check_int(self.OWNER, "max_length", self.max_length, 1)
        if self.sae_source is not None and not isinstance(self.sae_source, str):
            raise ConfigError(
                f"{self.OWNER}.sae_source={self.sae_source!r} is not allowed; it must be a string or None"
            )
        if not isinstance(self.head, HeadConfig):
            raise ConfigError(f"{self.OWNER}.head={self.head!r} is not allowed; it must be a HeadConfig")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``config_version``, every field, the head as its own `to_dict`."""
        return {**{"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}, "head": self.head.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "the config") -> SparseRMConfig:
        """The config `to_dict` wrote; `source` names the file in the one-line errors."""
        values = _fields_from_dict(cls, data, source)
        if "head" in values:
            values["head"] = HeadConfig.from_dict(values["head"], source=source)
        return _build(cls, values, source)

    def describe(self) -> str:
        """One line for the book: what the model reads, then its head's settings."""
        reads = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "head")
        return f"{reads}; head: {self.head.describe()}"
