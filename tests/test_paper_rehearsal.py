"""Rehearse the `paper` profile offline: Gemma-2-2B-it + a Gemma Scope SAE, as the hub serves them.

No machine here reaches the Hugging Face hub, so the paper profile's path (transformers'
`from_pretrained("google/gemma-2-2b-it")`, sae-lens's `SAE.from_pretrained(release, sae_id)`,
`datasets.load_dataset` for the built-in data sets) had never run. This test builds stand-ins
that have the real files' formats and places them where those libraries look in offline mode
(`HF_HUB_OFFLINE=1`):

* a tiny random Gemma-2 (`Gemma2ForCausalLM`, 16 blocks) with a Gemma tokenizer (transformers'
  own `GemmaTokenizer` on a byte-fallback vocabulary, Gemma's special tokens and
  Gemma-2-2B-it's chat template) in the hub cache as `models--google--gemma-2-2b-it`;
* a Gemma-Scope-format `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold) in the folder of
  the release the profile names (sae-lens's registry maps it to the repo and folder). sae-lens's
  Gemma 2 loader takes d_in = 2304 and d_sae = 16,384 from the repo and folder names, not
  from the file, so the tiny model is 2304 wide and the SAE has 16,384 latents, as the real ones;
* a TruthfulQA `generation` config in the `datasets` cache, as `load_dataset` leaves it.

Then it runs the paper profile through srlib's own functions, the command line and chapter 2
under papermill, each in a fresh interpreter whose environment says offline from the start
(the libraries read HF_HOME and HF_HUB_OFFLINE when they are imported), with
`SRLIB_DATA_DIR` unset. Sizes are shrunk (K, pairs); the widths are the real ones.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = "google/gemma-2-2b-it"
# Gemma-2-2B-it's chat template (its tokenizer_config.json): BOS written by the template, no
# system role, the assistant is "model", contents trimmed.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
    "user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' "
    "%}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)
D_MODEL = 2304  # what sae-lens's gemma_2 loader assumes for a "2b" repo
N_LAYERS = 16
K = 8
N_QUESTIONS = 30
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a fake commit hash for refs/main


# ------------------------------------------------------------------------------------------
# Stand-ins for the hub's files


def _gemma_tokenizer():
    """transformers' GemmaTokenizer (byte fallback, "▁" for spaces) on a character vocabulary."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for char in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def _tiny_gemma(tokenizer):
    """A Gemma-2 with the real width (2304) and tiny everything else, seeded."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=D_MODEL,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=64,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Gemma2ForCausalLM(config).eval()


def _snapshot(cache: Path, repo_id: str, kind: str = "models") -> Path:
    """The snapshot folder of `repo_id` in the hub cache layout, with refs/main pointing at it."""
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    folder = repo / "snapshots" / SNAPSHOT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _gemma_scope_params(path: Path, model, tokenizer, texts: list[str], layer: int) -> None:
    """A JumpReLU SAE in Gemma Scope's params.npz format, each latent firing on ~20% of `texts`.

    W_enc has random unit columns and W_dec = W_enc.T (Gemma Scope's initialisation); the
    thresholds are the 80th percentile of each latent's pre-activation at `layer` on `texts`.
    """
    d_sae = 16_384
    with torch.no_grad():
        rows = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            rows.append(model(**ids, output_hidden_states=True).hidden_states[layer + 1][0, -1])
        Z = torch.stack(rows).float()
        generator = torch.Generator().manual_seed(1)
        W_enc = torch.randn(D_MODEL, d_sae, generator=generator)
        W_enc /= W_enc.norm(dim=0, keepdim=True)
        threshold = (Z @ W_enc).quantile(0.8, dim=0).clamp_min(1e-3)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        W_enc=W_enc.numpy(),
        W_dec=W_enc.T.contiguous().numpy(),
        b_enc=np.zeros(d_sae, np.float32),
        b_dec=np.zeros(D_MODEL, np.float32),
        threshold=threshold.numpy(),
    )


def _questions() -> list[dict]:
    """TruthfulQA-shaped rows (the hub's `generation` config columns), seeded."""
    rng = np.random.default_rng(0)
    words = ["moon", "river", "bread", "stone", "glass", "tiger", "cloud", "paper", "salt", "iron"]

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words, n)).capitalize() + "."

    return [
        {
            "type": "Adversarial",
            "category": "Misconceptions",
            "question": f"Question {i}: what about the {words[i % len(words)]}?",
            "best_answer": sentence(5),
            "correct_answers": [sentence(5), sentence(6)],
            "incorrect_answers": [sentence(5), sentence(7)],
            "source": "https://example.org",
        }
        for i in range(N_QUESTIONS)
    ]


def _truthfulqa_cache(datasets_cache: Path, rows: list[dict]) -> None:
    """truthfulqa/truthful_qa, config "generation", split "validation", as load_dataset caches it."""
    from datasets import Dataset, DatasetInfo, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter

    folder = datasets_cache / "truthfulqa___truthful_qa" / "generation" / "0.0.0" / SNAPSHOT
    folder.mkdir(parents=True)
    table = Dataset.from_list(rows)
    with ArrowWriter(features=table.features, path=str(folder / "truthful_qa-validation.arrow")) as writer:
        writer.write_table(table.data.table)
        n, n_bytes = writer.finalize()
    splits = SplitDict(dataset_name="truthful_qa")
    splits.add(SplitInfo(name="validation", num_bytes=n_bytes, num_examples=n, dataset_name="truthful_qa"))
    DatasetInfo(
        dataset_name="truthful_qa", config_name="generation", version="0.0.0", features=table.features, splits=splits
    ).write_to_directory(str(folder))


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory, one_thread) -> dict:
    """Build every stand-in once; return the environment of an offline run and some paths."""
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    from srlib.profiles import get_profile
    from srlib.sae import parse_sae_source

    root = tmp_path_factory.mktemp("paper-rehearsal")
    hub, datasets_cache = root / "hf" / "hub", root / "hf" / "datasets"
    profile = get_profile("paper")
    tokenizer = _gemma_tokenizer()
    model = _tiny_gemma(tokenizer)
    model_dir = _snapshot(hub, MODEL_REPO)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rows = _questions()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": answer}], tokenize=False
        )
        for row in rows[:10]
        for answer in row["correct_answers"] + row["incorrect_answers"]
    ]
    source = parse_sae_source(profile.sae_source)
    repo_id, folder = get_repo_id_and_folder_name(source.release, source.sae_id)
    _gemma_scope_params(_snapshot(hub, repo_id) / folder / "params.npz", model, tokenizer, texts, profile.layer)
    _truthfulqa_cache(datasets_cache, rows)

    pairs = root / "pairs.jsonl"
    with pairs.open("w") as handle:
        for row in rows[:12]:
            for good, bad in zip(row["correct_answers"], row["incorrect_answers"], strict=False):
                handle.write(json.dumps({"prompt": row["question"], "chosen": good, "rejected": bad}) + "\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "SRLIB_", "TRANSFORMERS_"))}
    env.update(
        HF_HOME=str(root / "hf"),
        HF_HUB_CACHE=str(hub),
        HF_DATASETS_CACHE=str(datasets_cache),
        HF_HUB_OFFLINE="1",
        SRLIB_CACHE_DIR=str(root / "srlib-cache"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    return {"root": root, "env": env, "pairs": pairs, "rows": rows}


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command in a fresh interpreter with `env`; fail the test with its stderr if it fails."""
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args[:4])} failed:\n{result.stderr[-3000:]}"
    return result


# ------------------------------------------------------------------------------------------
# The library path, run in a fresh offline interpreter by `test_library_path_offline`


def rehearse_library(root: str) -> None:
    """The paper profile through srlib's functions; writes what it saw to <root>/library.json."""
    from srlib.backbone import backbone_for_profile, format_text
    from srlib.data import load_pairs, load_truthfulqa_mc
    from srlib.profiles import get_profile
    from srlib.reward import RewardModel, SparseRM
    from srlib.sae import sae_for_profile

    profile = get_profile("paper").replace(k=K, seeds=(0,))
    backbone = backbone_for_profile(profile, device="cpu", progress=False)
    sae = sae_for_profile(profile, backbone, progress=False)
    train, val = load_pairs("truthfulqa:train"), load_pairs("truthfulqa:val")
    config = profile.sparserm_config()
    rm = SparseRM.fit(backbone, train, val, config=config, sae=sae, batch_size=profile.batch_size, progress=False)
    s_w, s_l = rm.score_pairs(train)
    rm.save_pretrained(Path(root) / "rm-library")
    loaded = RewardModel.from_pretrained(Path(root) / "rm-library")  # loads the backbone by its id
    l_w, l_l = loaded.score_pairs(train)
    cli = RewardModel.from_pretrained(Path(root) / "rm-cli")
    jsonl = load_pairs(Path(root) / "pairs.jsonl")
    refit = SparseRM.fit(backbone, jsonl, None, config=config, sae=sae, batch_size=profile.batch_size, progress=False)
    seen = {
        "source": backbone.source,
        "num_layers": backbone.num_layers,
        "hidden_size": backbone.hidden_size,
        "text": format_text(backbone.tokenizer, "Hi?", "Hello."),
        "d_sae": int(sae.cfg.d_sae),
        "hook": sae.cfg.metadata.hook_name,
        "n_train": len(train),
        "n_val": len(val),
        "first_pair": [train[0].prompt, train[0].chosen],
        "mc_questions": len(load_truthfulqa_mc("test")),
        "indices_w": rm.indices_w,
        "sae_info": rm.sae_info,
        "scores": [s_w.tolist(), s_l.tolist()],
        "reloaded_scores": [l_w.tolist(), l_l.tolist()],
        "loaded_source": loaded.backbone.source,
        "cli_scores": [t.tolist() for t in cli.score_pairs(jsonl)],
        "refit_scores": [t.tolist() for t in refit.score_pairs(jsonl)],
        "cli_indices_w": cli.indices_w,
        "refit_indices_w": refit.indices_w,
    }
    (Path(root) / "library.json").write_text(json.dumps(seen))


def test_library_and_command_line_offline(offline_hub):
    root, env = offline_hub["root"], offline_hub["env"]
    fit = _run(
        [
            sys.executable,
            "-m",
            "srlib",
            "fit",
            "--profile",
            "paper",
            "--train",
            str(offline_hub["pairs"]),
            "--out",
            str(root / "rm-cli"),
            "--k",
            str(K),
        ],
        env,
        root,
    )
    summary = json.loads(fit.stdout.strip().splitlines()[-1])
    assert summary["layer"] == 13 and summary["n_train"] == 24
    _run(
        [
            sys.executable,
            "-c",
            "import runpy, sys; runpy.run_path(sys.argv[1])['rehearse_library'](sys.argv[2])",
            __file__,
            str(root),
        ],
        env,
        root,
    )
    seen = json.loads((root / "library.json").read_text())

    assert (seen["source"], seen["num_layers"], seen["hidden_size"]) == ("hub", N_LAYERS, D_MODEL)
    assert seen["text"] == "<bos><start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    assert (seen["d_sae"], seen["hook"]) == (16_384, "blocks.13.hook_resid_post")
    # TruthfulQA came through `datasets` from its cache: 30 questions, 2 pairs each, split 4:1:5.
    assert (seen["n_train"], seen["n_val"], seen["mc_questions"]) == (24, 6, 15)
    questions = {row["question"]: row for row in offline_hub["rows"]}
    assert seen["first_pair"][1] in questions[seen["first_pair"][0]]["correct_answers"]
    assert len(seen["indices_w"]) == K and seen["sae_info"]["source"].startswith("sae-lens:gemma-scope-2b")
    assert seen["reloaded_scores"] == seen["scores"] and seen["loaded_source"] == "hub"
    # The command line and the library fit the same model from the same pairs.
    assert seen["cli_indices_w"] == seen["refit_indices_w"]
    assert seen["cli_scores"] == seen["refit_scores"]


def test_chapter_2_under_papermill_offline(offline_hub, monkeypatch):
    """Chapter 2 (SAE latents, direction selection, latent cards) with PROFILE="paper"."""
    import papermill

    root = offline_hub["root"]
    for key in [key for key in os.environ if key.startswith(("HF_", "SRLIB_", "TRANSFORMERS_"))]:
        monkeypatch.delenv(key)
    for key, value in offline_hub["env"].items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    source = ROOT / "notebooks" / "02_direction_selection.ipynb"
    executed, results = root / source.name, root / "02.results.json"
    papermill.execute_notebook(
        str(source),
        str(executed),
        kernel_name="python3",
        cwd=str(root),
        progress_bar=False,
        parameters={
            "PROFILE": "paper",
            "RESULTS_PATH": str(results),
            "K": K,
            "N_TABLE": 4,
            "N_SHOW": 2,
            "N_TEXTS": 2,
            "STABILITY_KS": [4, K],
            "STABILITY_SEEDS": [0],
        },
    )
    data = json.loads(results.read_text())
    assert data["profile"] == "paper" and set(data["tables"]) == {"top_latents", "stability"}
    assert (data["metrics"]["k"], data["metrics"]["layer"]) == (K, 13)
    printed = "".join(
        text
        for cell in json.loads(executed.read_text())["cells"]
        for out in cell.get("outputs", [])
        for text in out.get("text", [])
    )
    assert "google/gemma-2-2b-it, layer 13 of " in printed and "SAE with 16,384 latents" in printed


def test_generation_prompt_under_a_template_without_system_role():
    """Chapter 7's generation turns open with a system instruction; Gemma-2's template refuses
    that role, so srlib folds the instruction into the first user turn instead of failing."""
    from srlib.alignment import INSTRUCTIONS, generation_messages
    from srlib.data import PreferencePair
    from srlib.evaluate import prompt_ids

    tokenizer = _gemma_tokenizer()
    shot = PreferencePair(prompt="How do I pick a lock?", chosen="I cannot help.", rejected="Use a pin.")
    (kind, side), instruction = next(iter(INSTRUCTIONS.items()))
    messages = generation_messages("Is the sky blue?", [shot], kind, side)
    assert messages[0]["role"] == "system"
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template(messages, tokenize=False)
    text = tokenizer.decode(prompt_ids(tokenizer, messages))
    assert text.count("<start_of_turn>user") == 2 and text.endswith("<start_of_turn>model\n")
    first_user = text.split("<start_of_turn>user\n", 1)[1]
    assert first_user.startswith(instruction.strip()[:20]) and "How do I pick a lock?" in first_user


def test_a_layer_parameter_moves_the_gemma_scope_sae_with_it():
    """Chapters' LAYER and the CLI's --layer move a Gemma Scope source to that layer's SAE;
    an SAE that belongs to one layer is refused instead of being read at another."""
    from srlib.errors import ConfigError
    from srlib.profiles import get_profile

    paper = get_profile("paper")
    moved = paper.at_layer(paper.layer + 1)
    assert moved.layer == paper.layer + 1
    assert f"/layer_{paper.layer + 1}/" in moved.sae_source and f"/layer_{paper.layer}/" not in moved.sae_source
    assert paper.at_layer(None) is paper and paper.at_layer(paper.layer) is paper
    with pytest.raises(ConfigError, match="cannot move the SAE"):
        paper.replace(sae_source="some/folder").at_layer(3)
    cpu = get_profile("cpu")
    assert cpu.at_layer(8).sae_source == "train" and cpu.at_layer(8).layer == 8
