"""Hidden states of a backbone at one layer: the last token of each text, or every token.

Layer convention: layer L is the OUTPUT of decoder block L (0-indexed), TransformerLens /
Gemma Scope `blocks.L.hook_resid_post`, which is transformers' `hidden_states[L + 1]` for
L < num_layers - 1. (For the last block transformers' `hidden_states[-1]` has the final norm
applied; we return the block's output without it, for every L.)

The forward pass stops after block L: a forward hook on block L raises a private exception
that carries the block's output, so the blocks above and the LM head never run. That works
for any architecture whose blocks sit in one `ModuleList` (Llama, Gemma 2, Qwen, ...), without
copying the model's own forward code.

Tokenisation: a text that already starts with the BOS token (templates such as Gemma's and
Llama 3's write it) is tokenised without special tokens, so the BOS is not doubled. A text
longer than `max_length` tokens loses tokens on the LEFT, so the tokens the reward model
reads (near the end) are kept; a leading BOS is kept too.

Read position (`POSITIONS`): the paper reads "the last token" of prompt + response and leaves
open which one, since a chat template closes the answer with its own tokens (SmolLM2:
``<|im_end|>`` and a newline). `last` is the template's last token (that newline),
`end_of_turn` the token that closes the assistant turn (``<|im_end|>``, Gemma's
``<end_of_turn>``), `answer` the answer's own last token. One forward pass reads every requested position. A text that
does not end with the template's closing text (no template, or formatted otherwise) is read at its last token for
every position.

Batch invariance: a text is right-padded to a width fixed by its own length (the next
multiple of `_PAD_MULTIPLE` tokens, at least one pad) and batched only with texts of that
width, so in float32 its state is the same bits whatever else is extracted with it and on any
number of threads. (Padded to the longest text of its batch, a state's last bits changed with the
batch's composition, so a cold and a warm cache gave different scores.) Under autocast (the cpu
profile's bfloat16) that does not hold: the bfloat16 matrix products' last bits depend on how many
rows a product has and on the thread count, so a state differs in its last bits with the texts
batched with it and the threads that read it (`benchmarks/extraction.py` prints how many states
keep their bits). Where a cache entry exists it wins over a recomputation, so within one cache
the first value computed is the one every run uses; another cache (another machine, another
`--jobs`) may hold other bits, train another SAE and move the book's numbers as another SAE seed would.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from srlib.backbone import Backbone, format_pair
from srlib.cache import read_cache_entry
from srlib.data import PreferencePair
from srlib.errors import ConfigError, DataError
from srlib.paths import atomic_path, cache_dir
from srlib.progress import progress_bar

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Texts sorted by length are processed in windows of this many batches by
# `iter_token_activations`, which yields results in input order.
_WINDOW_BATCHES = 8
# Every text is right-padded to the next multiple of this many tokens, with at least one pad
# token (`_padded_width`), so its shapes and the masked attention path never depend on the
# texts batched with it.
_PAD_MULTIPLE = 32
# A message that cannot occur in real text, used to find the template's fixed prefix and suffix.
_SENTINEL = "\u2063srlib-sentinel\u2063"
#: Tokens a reward model can read (module docstring): the template's last token, the token that
#: closes the assistant turn, the answer's last token.
POSITIONS = ("last", "end_of_turn", "answer")
DEFAULT_POSITION = "last"


@dataclass(frozen=True)
class _Encoded:
    """Token ids of one text, per token whether it belongs to the template's prefix, and the
    index (counted from the end, -1 = last) of each read position."""

    ids: list[int]
    prefix: list[bool]
    reads: dict[str, int]


class _StopForward(Exception):
    """Raised by the hook on block L to end the forward pass; carries the block's output."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def token_states(
    backbone: Backbone,
    texts: Sequence[str],
    layer: int,
    *,
    positions: Sequence[str] = (DEFAULT_POSITION,),
    max_length: int = 512,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> dict[str, Tensor]:
    """{position: [n, d] float32 CPU tensor}: the layer-`layer` state of each text at each of
    `positions` (`POSITIONS`), in input order; one forward pass per text serves them all.

    With `cache=True` each text's state at each position is stored under
    `cache_dir("activations", <backbone identity>, "layer<L>-max<max_length>-<position>")` as
    `<sha256[:2]>/<sha256 of the text>.safetensors`, written atomically, and read back instead
    of recomputed on later calls. The texts are already chat-formatted, so the formatting is
    part of the key. `states_at_layers` does the same for several layers in one pass.
    """
    return states_at_layers(
        backbone,
        texts,
        (layer,),
        positions=positions,
        max_length=max_length,
        batch_size=batch_size,
        cache=cache,
        progress=progress,
    )[_check_layer(backbone, layer)]


def states_at_layers(
    backbone: Backbone,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    positions: Sequence[str] = (DEFAULT_POSITION,),
    max_length: int = 512,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> dict[int, dict[str, Tensor]]:
    """{layer: {position: [n, d] float32 CPU tensor}}: `token_states` at several layers, from
    one forward pass per text that stops at the deepest of them (a layer sweep costs the
    blocks above the shallowest layer once, not one pass per layer). Cached per layer and
    position exactly as `token_states` caches, so either function reads the other's entries.
    """
    layers = list(dict.fromkeys(_check_layer(backbone, layer) for layer in layers))
    if not layers:
        raise ConfigError("states_at_layers needs at least one layer")
    positions = _check_positions(positions)
    texts = list(texts)
    slots = [(layer, position) for layer in layers for position in positions]
    if not texts:
        return {layer: {p: torch.zeros(0, backbone.hidden_size) for p in positions} for layer in layers}
    folders = {(layer, p): _cache_folder(backbone, layer, max_length, p) for layer, p in slots} if cache else {}
    keys = [_text_key(text) for text in texts]
    states: dict[tuple[int, str], dict[str, Tensor]] = {slot: {} for slot in slots}
    for slot, folder in folders.items():
        for key in set(keys):
            path = _entry_path(folder, key)
            if path.exists():  # a damaged entry is warned about, recomputed and rewritten below
                entry = read_cache_entry(path, "activations", check=lambda found: _is_state(found, backbone))
                if entry is not None:
                    states[slot][key] = entry["state"]
    todo = {key: text for key, text in zip(keys, texts, strict=True) if any(key not in states[slot] for slot in slots)}
    if todo:
        todo_keys = list(todo)
        suffix = _template_suffix(backbone.tokenizer)
        encoded = [_encode(backbone.tokenizer, todo[key], max_length, suffix=suffix) for key in todo_keys]
        with progress_bar(
            total=len(encoded), desc=f"{layers_label(layers)} states", unit="text", disable=not progress
        ) as bar:
            for rows, hidden in _forward_batches_at(backbone, encoded, layers, batch_size):
                for i, row in enumerate(rows):
                    key = todo_keys[row]
                    for layer, position in slots:
                        if key in states[layer, position]:
                            continue  # a cached value wins: every run uses the first value computed
                        index = len(encoded[row].ids) + encoded[row].reads[position]
                        state = hidden[layer][i, index].float().cpu().clone()
                        states[layer, position][key] = state
                        if (layer, position) in folders:
                            _write_entry(_entry_path(folders[layer, position], key), state)
                bar.update(len(rows))
    return {layer: {p: torch.stack([states[layer, p][key] for key in keys]) for p in positions} for layer in layers}


def last_token_states(
    backbone: Backbone, texts: Sequence[str], layer: int, *, position: str = DEFAULT_POSITION, **kwargs
) -> Tensor:
    """[n, d] float32 CPU tensor: the layer-`layer` state of each text at one read `position`
    (default the text's last token), in order; kwargs as `token_states` (cache included)."""
    return token_states(backbone, texts, layer, positions=(position,), **kwargs)[position]


def pair_states(backbone: Backbone, pairs: Sequence[PreferencePair], layer: int, **kwargs) -> tuple[Tensor, Tensor]:
    """(Z_chosen, Z_rejected), each [n_pairs, d]: last-token states of the formatted pairs.

    Both sides go through one `last_token_states` call (kwargs passed on), so they share
    batches and the cache.
    """
    texts = [format_pair(backbone.tokenizer, pair) for pair in pairs]
    states = last_token_states(backbone, [c for c, _ in texts] + [r for _, r in texts], layer, **kwargs)
    return states[: len(pairs)], states[len(pairs) :]


def pair_token_states(
    backbone: Backbone, pairs: Sequence[PreferencePair], layer: int, *, positions: Sequence[str] = POSITIONS, **kwargs
) -> dict[str, tuple[Tensor, Tensor]]:
    """{position: (Z_chosen, Z_rejected)}: `pair_states` at several read positions, from one
    forward pass per text (kwargs as `token_states`)."""
    texts = [format_pair(backbone.tokenizer, pair) for pair in pairs]
    states = token_states(backbone, [c for c, _ in texts] + [r for _, r in texts], layer, positions=positions, **kwargs)
    return {position: (Z[: len(pairs)], Z[len(pairs) :]) for position, Z in states.items()}


def iter_token_activations(
    backbone: Backbone,
    texts: Sequence[str],
    layer: int,
    *,
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = True,
    cache_positions: Sequence[str] = (),
) -> Iterator[Tensor]:
    """Yield, for each text in order, a [n_tokens, d] float32 CPU tensor of its layer states.

    `cache_positions`: read positions (`POSITIONS`) whose state of each text this same pass
    also stores in `token_states`'s cache (an entry already there is kept), so a text whose
    tokens an SAE corpus needs is never run again for its reward-model state.

    Excluded tokens: padding, and the chat template's fixed prefix, i.e. every token that
    lies wholly before the first message's content when the text starts with that prefix.
    For SmolLM2 that is "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n" (the
    default system prompt and the first user header); for a tokenizer that prepends a BOS it
    includes the BOS. These tokens are the same in every formatted text, and attention is
    causal, so their states are one identical vector in every text: keeping them would
    flood an SAE's training set with copies. A text that does not start with the prefix (or
    lost it to truncation) loses only a leading BOS. A text may yield zero rows. Not cached.
    `iter_token_activations_at_layers` streams several layers from one pass.
    """
    layer = _check_layer(backbone, layer)
    for rows in iter_token_activations_at_layers(
        backbone,
        texts,
        (layer,),
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
        cache_positions=cache_positions,
    ):
        yield rows[layer]


def iter_token_activations_at_layers(
    backbone: Backbone,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = True,
    cache_positions: Sequence[str] = (),
    bar: tqdm | None = None,
) -> Iterator[dict[int, Tensor]]:
    """Yield, for each text in order, {layer: [n_tokens, d] float32 CPU tensor}: the token
    rows of `iter_token_activations` at every one of `layers`, from one forward pass per text
    that stops at the deepest of them (the same batches, so the same bits, as one pass per
    layer). `cache_positions` fills `token_states`'s cache at every layer. `bar`: an open
    progress bar to advance by one per text instead of opening one (`progress` then unused).
    """
    layers = list(dict.fromkeys(_check_layer(backbone, layer) for layer in layers))
    if not layers:
        raise ConfigError("iter_token_activations_at_layers needs at least one layer")
    texts = list(texts)
    prefix = _template_prefix(backbone.tokenizer)
    suffix = _template_suffix(backbone.tokenizer)
    positions = _check_positions(cache_positions) if cache_positions else ()
    folders = {
        layer: {position: _cache_folder(backbone, layer, max_length, position) for position in positions}
        for layer in layers
    }
    window = max(1, batch_size * _WINDOW_BATCHES)
    with (
        nullcontext(bar)
        if bar is not None
        else progress_bar(total=len(texts), desc=f"{layers_label(layers)} tokens", unit="text", disable=not progress)
    ) as shown:
        for start in range(0, len(texts), window):
            chunk = texts[start : start + window]
            encoded = [_encode(backbone.tokenizer, text, max_length, prefix, suffix) for text in chunk]
            results: dict[int, dict[int, Tensor]] = {}
            for rows, hidden in _forward_batches_at(backbone, encoded, layers, batch_size):
                for i, row in enumerate(rows):
                    keep = ~torch.tensor(encoded[row].prefix, dtype=torch.bool)
                    results[row] = {}
                    for layer in layers:
                        real = hidden[layer][i, : len(encoded[row].ids)]
                        results[row][layer] = real[keep.to(real.device)].float().cpu()
                        if folders[layer]:
                            _store_states(folders[layer], chunk[row], real, encoded[row].reads)
                shown.update(len(rows))
            yield from (results[row] for row in range(len(encoded)))


def layers_label(layers: Sequence[int]) -> str:
    """'layer 8' or 'layers 8, 15, 22': how a progress bar names the layers of one forward pass."""
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"


def _check_layer(backbone: Backbone, layer: int) -> int:
    """`layer` as an int (numpy integers welcome), or a one-line ConfigError."""
    n = backbone.num_layers
    try:
        layer = operator.index(layer)
    except TypeError:
        raise ConfigError(f"layer must be an integer, got {layer!r}") from None
    if not 0 <= layer < n:
        raise ConfigError(f"layer {layer} out of range: model has {n} layers (0..{n - 1})")
    return layer


def _check_positions(positions: Sequence[str]) -> tuple[str, ...]:
    """`positions` as a tuple without repeats, or a one-line ConfigError naming the valid ones."""
    positions = tuple(dict.fromkeys([positions] if isinstance(positions, str) else positions))
    unknown = [p for p in positions if p not in POSITIONS]
    if unknown or not positions:
        raise ConfigError(
            f"unknown read position {unknown[0] if unknown else None!r}; choose among: {', '.join(POSITIONS)}"
        )
    return positions


def _cache_folder(backbone: Backbone, layer: int, max_length: int, position: str) -> Path:
    """The cache folder for one backbone, layer, max_length and read position; records what it holds."""
    identity = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone.identity)
    folder = cache_dir("activations", identity, f"layer{layer}-max{max_length}-{position}")
    info = folder / "info.json"
    if not info.exists():
        with atomic_path(info) as tmp:
            tmp.write_text(
                json.dumps(
                    {
                        "model_id": backbone.model_id,
                        "identity": backbone.identity,
                        "layer": layer,
                        "max_length": max_length,
                        "position": position,
                    },
                    indent=1,
                )
            )
    return folder


def _is_state(tensors: dict[str, Tensor], backbone: Backbone) -> bool:
    """Whether a cache entry holds one finite hidden state of the backbone's width."""
    if set(tensors) != {"state"}:
        return False
    state = tensors["state"]
    return state.shape == (backbone.hidden_size,) and bool(torch.isfinite(state).all())


def _write_entry(path: Path, state: Tensor) -> None:
    """Store one state atomically: a crash mid-write leaves no file at `path`."""
    with atomic_path(path) as tmp:
        save_file({"state": state.contiguous()}, str(tmp))


def _text_key(text: str) -> str:
    """The cache key of a (chat-formatted) text: its sha256."""
    return hashlib.sha256(text.encode()).hexdigest()


def _entry_path(folder: Path, key: str) -> Path:
    """Where the state of the text with cache key `key` lives in a layer/position `folder`."""
    return folder / key[:2] / f"{key}.safetensors"


def _store_states(folders: dict[str, Path], text: str, hidden: Tensor, reads: dict[str, int]) -> None:
    """Cache the state of `text` (its rows `hidden` [n_tokens, d]) at each position of
    `folders` that has no entry yet: the entry `token_states` would read or write."""
    key = _text_key(text)
    for position, folder in folders.items():
        path = _entry_path(folder, key)
        if not path.exists():
            _write_entry(path, hidden[len(hidden) + reads[position]].float().cpu().clone())


def _template_prefix(tokenizer) -> str:
    """The chat template's text before the first message's content ("" without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=False
    )
    return rendered[: rendered.index(_SENTINEL)]


def _template_suffix(tokenizer) -> str:
    """The chat template's text after an assistant answer's content ("" without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}],
        tokenize=False,
        add_generation_prompt=False,
    )
    return rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :]


def _read_positions(offsets: Sequence[tuple[int, int]], text: str, suffix: str) -> dict[str, int]:
    """Each read position as an index from the end (-1 = last token); see the module docstring.

    The answer ends where the template's closing `suffix` starts: `answer` is the last token
    that ends there or before, `end_of_turn` the first token after it.
    """
    n = len(offsets)
    if not suffix.strip() or not text.endswith(suffix):
        return {position: -1 for position in POSITIONS}
    cut = len(text) - len(suffix)
    closing = next((i for i, (_, end) in enumerate(offsets) if end > cut), n - 1)
    return {"last": -1, "end_of_turn": closing - n, "answer": max(closing - 1, 0) - n}


def _encode(tokenizer, text: str, max_length: int, prefix: str = "", suffix: str = "") -> _Encoded:
    """Token ids of `text`, left-truncated to `max_length` (keeping a leading BOS).

    `prefix[i]` is True for the leading BOS and for tokens that end inside `prefix` when the
    text starts with it; `reads` gives the read positions of a text that ends with `suffix`
    (the template's closing text), counted from the end so truncation cannot move them.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}")
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not ids:
        raise DataError(f"empty text {text!r}: it has no token to read a state from")
    cut = len(prefix) if prefix and text.startswith(prefix) else 0
    in_prefix = [end <= cut for _, end in enc["offset_mapping"]]
    has_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
    if has_bos:
        in_prefix[0] = True
    reads = _read_positions(enc["offset_mapping"], text, suffix)
    if len(ids) > max_length:
        head = 1 if has_bos and max_length > 1 else 0
        tail = max_length - head
        ids = ids[:head] + ids[len(ids) - tail :]
        in_prefix = in_prefix[:head] + in_prefix[len(in_prefix) - tail :]
        reads = {position: max(index, -len(ids)) for position, index in reads.items()}
    return _Encoded(ids, in_prefix, reads)


def _decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder blocks (`model.model.layers` for Llama, Gemma 2, Qwen)."""
    n = model.config.get_text_config().num_hidden_layers
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == n:
        return layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def _forward_to_layers(
    model: nn.Module, layers: Sequence[int], input_ids: Tensor, attention_mask: Tensor
) -> dict[int, Tensor]:
    """{layer: [batch, tokens, d]}: the output of each block in `layers` from one pass; no
    block above the deepest of them runs.

    The pass runs under `torch.inference_mode`; the results are cloned outside it, so callers
    get ordinary tensors that autograd accepts (an SAE or a reward head trains on them).
    """
    blocks, deepest, outputs = _decoder_layers(model), max(layers), {}

    def keep(layer: int):
        def hook(module: nn.Module, args, output) -> None:
            outputs[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward(outputs[layer])

        return hook

    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in set(layers)]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        return {layer: outputs[layer].clone() for layer in layers}
    finally:
        for handle in handles:
            handle.remove()
    raise RuntimeError(f"block {deepest} did not run during the forward pass")


def _forward_to_layer(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[batch, tokens, d]: the output of block `layer`; no block above it runs."""
    return _forward_to_layers(model, (layer,), input_ids, attention_mask)[layer]


def _padded_width(n_tokens: int) -> int:
    """The width a text of `n_tokens` tokens is padded to: the next multiple of `_PAD_MULTIPLE`
    with at least one pad token, so no mask is all ones (which would switch attention kernels)."""
    return (n_tokens // _PAD_MULTIPLE + 1) * _PAD_MULTIPLE


def length_batches(
    lengths: Sequence[int], batch_size: int, *, longest_first: bool = False, equal_lengths: bool = False
) -> list[list[int]]:
    """Indices of `lengths` grouped into batches of up to `batch_size` items of similar length,
    so a batch pads little; the one home of srlib's length-sorted batching.

    Items are sorted by length (a stable sort: equal lengths keep their order), shortest first
    or with `longest_first`, and cut into consecutive batches. With `equal_lengths` a batch
    never mixes two lengths (a shorter last batch per length instead), so what a batch holds
    never changes the width an item is padded to.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i] if longest_first else lengths[i])
    if not equal_lengths:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for index in order:
        if not batches or len(batches[-1]) == batch_size or lengths[batches[-1][-1]] != lengths[index]:
            batches.append([])
        batches[-1].append(index)
    return batches


def _batches(encoded: Sequence[_Encoded], batch_size: int, pad_id: int) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """(rows, input_ids, attention_mask) of up to `batch_size` texts of one padded width
    (`_padded_width`), right-padded, widest first: a text's shapes do not depend on its batch."""
    widths = [_padded_width(len(text.ids)) for text in encoded]
    for rows in length_batches(widths, batch_size, longest_first=True, equal_lengths=True):
        input_ids = torch.full((len(rows), widths[rows[0]]), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), widths[rows[0]]), dtype=torch.long)
        for j, row in enumerate(rows):
            n = len(encoded[row].ids)
            input_ids[j, :n] = torch.tensor(encoded[row].ids)
            attention_mask[j, :n] = 1
        yield rows, input_ids, attention_mask


def _forward_batches_at(
    backbone: Backbone, encoded: Sequence[_Encoded], layers: Sequence[int], batch_size: int
) -> Iterator[tuple[list[int], dict[int, Tensor]]]:
    """(rows, {layer: block output [b, width, d]}) for each batch of `_batches`, every layer
    from one pass."""
    tokenizer = backbone.tokenizer
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    device = backbone.device
    for rows, input_ids, attention_mask in _batches(encoded, batch_size, pad_id):
        with backbone.reading():  # torch.autocast when the backbone reads states in a lower precision
            hidden = _forward_to_layers(backbone.model, layers, input_ids.to(device), attention_mask.to(device))
        yield rows, {layer: states.float() for layer, states in hidden.items()}
