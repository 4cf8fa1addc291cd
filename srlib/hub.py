"""Share reward models and SAEs on the Hugging Face Hub, with huggingface_hub's conventions.

* `model_card(rm, ...)`: the `README.md` that `FeatureRM.save_pretrained` writes beside the
  weights, a `huggingface_hub.ModelCard` whose YAML metadata says what the model reads (base
  model, layer, SAE source, K, feature kind), what it was trained on, its held-out accuracy
  with an interval when the caller gives one (`HeldOutAccuracy`), its licence, and
  `library_name: srlib`.
* `push_to_hub(rm, repo_id)`: `save_pretrained` into a temporary folder, then
  `HfApi.create_repo(exist_ok=True)` and `HfApi.upload_folder`, as `ModelHubMixin.push_to_hub`
  does (`RewardModel.push_to_hub` calls it).
* `download(repo_id_or_path)`: a local folder as it is, or `snapshot_download` of a hub repo,
  restricted to the files srlib writes (`ALLOW_PATTERNS`: no code file is ever fetched). The
  downloaded folder then goes through the same loader as a local one
  (`RewardModel.from_pretrained`: srlib's fixed class table, safetensors weights).
* `push_sae_to_hub(sae, repo_id, sae_id)`: sae-lens's own uploader, so that
  `SAE.from_pretrained(repo_id, sae_id)` loads it back (`srlib.sae.save_sae` writes the same
  files to disk).

Nothing here is called by the book; every hub call is tested against stubs.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, snapshot_download

from srlib.errors import SrlibError, one_line

if TYPE_CHECKING:
    from srlib.reward import FeatureRM, RewardModel

#: The files a saved reward model may hold (`srlib.reward`): all that `download` fetches.
ALLOW_PATTERNS = ["config.json", "model.safetensors", "README.md", "sae/*"]
#: Card metadata: the paper the method comes from, and the tags every card carries.
PAPER = "Liu et al., SparseRM: A Lightweight Preference Modeling with Sparse Autoencoder (AAAI 2026)"
TAGS = ["reward-model", "sparse-autoencoder", "sparserm", "srlib"]
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class HeldOutAccuracy:
    """A reward model's pair accuracy on held-out pairs, with its interval, for the model card.

    `accuracy`, `low` and `high` are percent; a tie counts 1/2, as in the book's comparisons
    (`srlib.evaluate.pair_outcomes`). The interval is `compare_paired`'s paired bootstrap against
    a model that is never right, i.e. the percentile bootstrap interval of the accuracy.
    """

    data: str
    accuracy: float
    low: float
    high: float
    n_pairs: int
    tie_share: float
    confidence: float = 0.95

    @classmethod
    def from_scores(
        cls, s_w: Sequence[float], s_l: Sequence[float], *, data: str, confidence: float = 0.95
    ) -> HeldOutAccuracy:
        """From the scores of the chosen and rejected answers of held-out pairs (`rm.score_pairs`)."""
        import numpy as np

        from srlib.evaluate import compare_paired, pair_outcomes, tie_share

        outcomes = pair_outcomes(s_w, s_l)
        result = compare_paired(
            outcomes, np.zeros_like(outcomes), name_a="model", name_b="never right", confidence=confidence
        )
        return cls(
            data=data,
            accuracy=result.accuracy_a,
            low=result.low,
            high=result.high,
            n_pairs=result.n_pairs,
            tie_share=tie_share(s_w, s_l),
            confidence=confidence,
        )


def _hub_id(model_id: str | None) -> str | None:
    """`model_id` if it names a hub model (not a local folder, not srlib's in-process tiny model)."""
    from srlib.profiles import TINY_MODEL_ID

    if not model_id or model_id == TINY_MODEL_ID or Path(model_id).expanduser().exists():
        return None
    return model_id if _REPO_ID.fullmatch(model_id) else None


def model_card(
    rm: FeatureRM,
    *,
    training_data: str | None = None,
    evaluation: HeldOutAccuracy | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """The model card of a fitted SparseRM / DenseRM: YAML metadata and a short text.

    Every value comes from the model (its config) or from the caller: `training_data` says
    what it was fitted on (e.g. "truthfulqa:train"), `evaluation` its held-out accuracy,
    `datasets` hub dataset ids for the Hub's dataset links.
    """
    config = rm.rm_config
    name = model_name or type(rm).__name__
    base_model = _hub_id(rm.backbone_record["model_id"])
    sae_source = config.sae_source
    metadata: dict[str, Any] = {
        "layer": config.layer,
        "k": config.k,
        "feature_kind": config.features,
        "sae_source": sae_source,
        "read_position": config.position,
        "backbone_weights": rm.backbone_record["weights"],
        "training_data": training_data,
        "trainable_parameters": rm.num_trainable_parameters(),
        "head": config.head.to_dict(),
    }
    results = None
    if evaluation is not None:
        metadata["held_out_accuracy"] = asdict(evaluation)
        results = [
            EvalResult(
                task_type="text-classification",
                task_name="preference pair accuracy",
                dataset_type=evaluation.data,
                dataset_name=evaluation.data,
                metric_type="accuracy",
                metric_value=round(evaluation.accuracy, 2),
                metric_name="pair accuracy (%, ties 1/2)",
            )
        ]
    data = ModelCardData(
        base_model=base_model,
        library_name="srlib",
        license=license,
        tags=[*TAGS, config.features],
        datasets=list(datasets) if datasets else None,
        model_name=name,
        eval_results=results,
        **{key: value for key, value in metadata.items() if value is not None},
    )
    reads = f"layer {config.layer} of {base_model or Path(str(rm.backbone_record['model_id'])).name}"
    lines = [
        f"# {name}",
        "",
        f"A reward model from srlib ({PAPER}): a small head on the hidden state at {reads}"
        + (
            f", projected onto {config.k} + {config.k} SAE decoder directions (SAE: "
            f"{'trained by srlib on the backbone' if sae_source == 'train' else sae_source})."
            if config.k
            else "."
        ),
        "",
    ]
    if training_data:
        lines += [f"Trained on: {training_data}.", ""]
    if evaluation is not None:
        lines += [
            f"Held-out pair accuracy on {evaluation.data}: {evaluation.accuracy:.1f}% "
            f"({evaluation.confidence:.0%} CI {evaluation.low:.1f} to {evaluation.high:.1f}, "
            f"{evaluation.n_pairs} pairs, ties count 1/2).",
            "",
        ]
    lines += [
        "```python",
        "from srlib.reward import RewardModel",
        "",
        'rm = RewardModel.from_pretrained("<repo id or folder>")',
        "scores = rm.score_pairs(pairs)",
        "reward_function = rm.as_reward_function()  # TRL's reward_funcs",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def push_to_hub(
    rm: RewardModel,
    repo_id: str,
    *,
    commit_message: str = "Upload srlib reward model",
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
    **save_kwargs,
) -> str:
    """Save `rm` into a temporary folder and upload it to `repo_id` (created if missing), as
    `huggingface_hub.ModelHubMixin.push_to_hub` does; `save_kwargs` go to `save_pretrained`
    (e.g. `model_card_kwargs`). Returns the commit's URL."""
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        rm.save_pretrained(folder, **save_kwargs)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=branch,
            create_pr=create_pr,
        )


def download(
    repo_id_or_path: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """A local folder as it is, else the snapshot of hub repo `repo_id_or_path` (only
    `ALLOW_PATTERNS`). A name that is neither a folder nor a repo id is returned as it is, for
    the loader's own "not a saved reward model" line; a hub failure is one line."""
    path = Path(repo_id_or_path).expanduser()
    if path.exists() or not _REPO_ID.fullmatch(str(repo_id_or_path)):
        return path
    try:
        return Path(
            snapshot_download(
                str(repo_id_or_path),
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
                allow_patterns=ALLOW_PATTERNS,
            )
        )
    except Exception as error:  # huggingface_hub's offline, not-found, auth and HTTP errors
        raise SrlibError(
            f"{repo_id_or_path} is neither a local folder nor a reachable hub repo "
            f"({type(error).__name__}: {one_line(str(error), 120)}); check the name, "
            "or unset HF_HUB_OFFLINE and connect"
        ) from None


def push_sae_to_hub(sae, repo_id: str, sae_id: str, *, revision: str = "main") -> None:
    """Upload an SAE in sae-lens's format (cfg.json with its metadata + weights) under `sae_id`
    in `repo_id`, with sae-lens's uploader; `SAE.from_pretrained(repo_id, sae_id)` loads it."""
    from sae_lens import upload_saes_to_huggingface

    upload_saes_to_huggingface({sae_id: sae}, hf_repo_id=repo_id, hf_revision=revision, show_progress=False)
