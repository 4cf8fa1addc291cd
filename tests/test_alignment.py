"""srlib.alignment on the smoke profile's tiny model: filtering, one DPO round, the resumable
loop and the shared round-1 generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import srlib.alignment as al
from srlib.backbone import load_backbone
from srlib.data import PreferencePair, load_pairs
from srlib.errors import ConfigError
from srlib.evaluate import response_logprobs
from srlib.present import alignment_line
from srlib.profiles import TINY_MODEL_ID

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


class FixedRM:
    """A stand-in reward model: scores looked up by response text."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def score_pairs(self, pairs):
        return (
            torch.tensor([self.scores[p.chosen] for p in pairs]),
            torch.tensor([self.scores[p.rejected] for p in pairs]),
        )


class LengthRM:
    """A stand-in reward model that prefers the shorter answer (any deterministic rule will do)."""

    def score_pairs(self, pairs):
        return (
            torch.tensor([-float(len(p.chosen)) for p in pairs]),
            torch.tensor([-float(len(p.rejected)) for p in pairs]),
        )


def test_filter_keeps_exactly_the_tuples_with_s_w_above_s_l():
    tuples = [
        PreferencePair("x", "a", "b"),
        PreferencePair("x", "c", "d"),
        PreferencePair("x", "e", "f"),
        PreferencePair("x", "g", "g"),
        PreferencePair("x", "", "h"),
    ]
    rm = FixedRM({"a": 2.0, "b": 1.0, "c": 1.0, "d": 3.0, "e": 0.5, "f": 0.5, "g": 9.0, "h": -9.0, "": 5.0})
    verdict = al.filter_tuples(tuples, rm)
    # kept: a>b; dropped: c<d, the tie e=f, identical answers g=g, an empty answer
    assert verdict.keep == [True, False, False, False, False]
    assert verdict.s_w[:3] == [2.0, 1.0, 0.5] and verdict.s_l[:3] == [1.0, 3.0, 0.5]
    # WO RM keeps every tuple that carries a preference
    assert al.filter_tuples(tuples, None).keep == [True, True, True, False, False]


def test_config_rejects_bad_settings():
    with pytest.raises(ConfigError):
        al.AlignmentConfig(track="honesty")
    with pytest.raises(ConfigError):
        al.AlignmentConfig(track="truthfulness")  # a kind of track, not a Table 1 track
    with pytest.raises(ConfigError):
        al.AlignmentConfig(track="red-teaming", reference="policy")
    with pytest.raises(ConfigError):
        al.AlignmentConfig(track="red-teaming", rounds=0)
    with pytest.raises(TypeError, match="track"):
        al.AlignmentConfig()  # no default track: chapter 7 chooses one on validation
    assert al.AlignmentConfig(track="truthfulqa").metric == "mc2"
    cfg = al.AlignmentConfig.for_profile("smoke", track="red-teaming", rounds=3)
    assert al.AlignmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_generation_prompt_holds_the_shots_and_the_plain_prompt_is_kept():
    shots = [PreferencePair("Q1?", "true answer", "false answer")]
    good = al.generation_messages("Q?", shots, "truthfulness", "good")
    bad = al.generation_messages("Q?", shots, "truthfulness", "bad")
    assert [m["role"] for m in good] == ["system", "user", "assistant", "user"]
    assert good[2]["content"] == "true answer" and bad[2]["content"] == "false answer"
    assert good[-1] == bad[-1] == {"role": "user", "content": "Q?"}


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_dpo_round_changes_the_adapter_and_raises_the_margin(tmp_path, autocast):
    backbone = load_backbone(TINY_MODEL_ID)
    model, tok = backbone.model, backbone.tokenizer
    tuples = [
        PreferencePair(f"Question number {i}?", "I am sorry, but I cannot help with that.", "Here is a careful answer.")
        for i in range(8)
    ]
    prompt = tuples[0].prompt

    def margin():
        lp = response_logprobs(model, tok, prompt, [tuples[0].chosen, tuples[0].rejected])
        return float(lp[0] - lp[1])

    before = margin()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = al.AlignmentConfig.for_profile("smoke", track="red-teaming", epochs=3, learning_rate=5e-3, autocast=autocast)
    model, stats = al.dpo_round(model, tok, tuples, cfg, seed=0, adapter_dir=tmp_path / "adapter", progress=False)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights_before[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # merged, q/v only
    assert not any("lora" in k for k in model.state_dict())
    assert stats["steps"] == 6 and len(stats["epochs"]) == 3  # 8 tuples, batch 4, 3 epochs
    assert stats["epochs"][-1]["rewards/margins"] > stats["epochs"][0]["rewards/margins"]
    assert margin() > before + 1.0


def test_micro_batches_with_accumulation_train_the_same_adapter_as_the_whole_batch(tmp_path):
    """A DPO step on a batch of 4 pairs taken as 4 micro-batches of 1 (gradients accumulated) is
    the same step: the memory and the padding change, the trained adapter does not. One pair a
    step, by contrast, trains another adapter (so the comparison can tell them apart)."""
    backbone = load_backbone(TINY_MODEL_ID)
    tuples = [
        PreferencePair("Why? " * (1 + i), "I cannot help with that. " * (1 + i % 3), "Sure, here it is.")
        for i in range(8)
    ]
    base = al.AlignmentConfig.for_profile("smoke", track="red-teaming", epochs=2, learning_rate=5e-3)

    def adapter(**changes):
        config = base.replace(**changes)
        folder = tmp_path / "-".join(f"{k}{v}" for k, v in changes.items())
        model = copy.deepcopy(backbone.model)
        _, stats = al.dpo_round(model, backbone.tokenizer, tuples, config, seed=0, adapter_dir=folder, progress=False)
        return load_file(folder / "adapter_model.safetensors"), stats["steps"]

    whole, whole_steps = adapter(batch_size=4, gradient_accumulation_steps=1)
    micro, micro_steps = adapter(batch_size=1, gradient_accumulation_steps=4)
    single, single_steps = adapter(batch_size=1, gradient_accumulation_steps=1)
    assert base.replace(batch_size=1, gradient_accumulation_steps=4).effective_batch_size == 4
    assert whole_steps == micro_steps == 4 and single_steps == 16
    assert whole.keys() == micro.keys()
    for name, value in whole.items():
        torch.testing.assert_close(micro[name], value, rtol=1e-3, atol=1e-5)  # float rounding only
    assert any((single[name] - value).abs().max() > 1e-3 for name, value in whole.items())


def test_the_setup_line_counts_a_batch_as_its_pairs_per_step():
    cpu = al.AlignmentConfig.for_profile("cpu", track="red-teaming")
    assert cpu.effective_batch_size == 8 and cpu.batch_size == 1  # one pair per pass on 2 cores
    assert f"batch {cpu.effective_batch_size} (micro-batches of 1, accumulated)" in alignment_line(cpu, 1)
    assert "batch 4, " in alignment_line(al.AlignmentConfig.for_profile("smoke", track="red-teaming"), 1)


def test_the_policy_runs_in_the_precision_its_config_names():
    model = load_backbone(TINY_MODEL_ID).model
    x = torch.randn(2, 64)
    layer = model.model.layers[0].mlp.up_proj
    for autocast, dtype in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        cfg = al.AlignmentConfig.for_profile("smoke", track="red-teaming", autocast=autocast)
        with al.policy_precision(model, cfg):
            assert layer(x).dtype == dtype
    with pytest.raises(ConfigError, match="autocast must be None or 'bfloat16', got 'float16'"):
        al.AlignmentConfig.for_profile("smoke", track="red-teaming", autocast="float16")


def _comparable(result: al.AlignmentResult) -> dict:
    data = result.to_dict()
    for run in data["runs"].values():
        for record in run["rounds"]:
            record.pop("seconds")
            if record["train"]:
                record["train"].pop("seconds")
    return data


def test_safety_prompts_come_from_the_generation_split_and_shots_from_training_data():
    cfg = al.AlignmentConfig.for_profile("smoke", track="red-teaming", n_shots=2, n_prompts=20)
    prompts, shots = al.prompts_and_shots(cfg)
    assert len(prompts) == 20 and len(set(prompts)) == 20 and len(shots) == 2
    assert set(prompts) <= {p.prompt for p in load_pairs("hh-harmless:gen")}
    assert {s.source for s in shots} == {"hh-harmless"}
    assert {s.pair_id for s in shots} <= {p.pair_id for p in load_pairs("hh-harmless:train")}


def test_loop_shares_round1_and_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg = al.AlignmentConfig.for_profile("smoke", track="truthfulqa", reference="previous")
    rms = {"WO RM": None, "Length RM": LengthRM()}

    generated_rounds = []
    real_generate = al.generate_tuples

    def spy_generate(*args, **kwargs):
        generated_rounds.append(kwargs["round_index"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(al, "generate_tuples", spy_generate)
    full = al.run_alignment(cfg, rms, out_dir=tmp_path / "full", progress=False)
    # round 1 is generated once for both reward models, round 2 once per reward model
    assert sorted(generated_rounds) == [1, 2, 2]
    r1 = [
        al.read_tuples(tmp_path / "full" / "runs" / slug / "round_1" / "tuples.jsonl")
        for slug in ("wo-rm", "length-rm")
    ]
    assert [(t["chosen"], t["rejected"]) for t in r1[0]] == [(t["chosen"], t["rejected"]) for t in r1[1]]
    assert [t["kept"] for t in r1[1]] == [
        t["s_w"] > t["s_l"] and t["chosen"] != t["rejected"] and bool(t["chosen"]) and bool(t["rejected"])
        for t in r1[1]
    ]
    assert full.round1_filter["n_generated"] == cfg.n_prompts
    assert full.runs["Length RM"].kept[0] == sum(t["kept"] for t in r1[1])
    table = full.table()
    assert [row["method"] for row in table] == ["base policy", "WO RM", "Length RM"]
    assert {row["track"] for row in table} == {"truthfulqa"}
    assert {"mc1", "mc1_se", "mc2_delta", "mc2_delta_low", "mc2_delta_high"} <= set(table[2])
    assert "mc1_items" not in table[2]
    change = full.compare("Length RM", "base policy", "mc2")
    assert table[2]["mc2_delta"] == change.difference and change.low <= change.difference <= change.high
    assert set(full.base_test) >= {"mc1", "mc2", "mc1_se", "mc2_se", "n"}

    # kill WO RM's second round (WO RM always trains), then rerun
    real_dpo = al.dpo_round

    def dying_dpo(*args, **kwargs):
        if kwargs["seed"] == al._round_seed(cfg, 2):
            raise RuntimeError("simulated kill")
        return real_dpo(*args, **kwargs)

    monkeypatch.setattr(al, "dpo_round", dying_dpo)
    with pytest.raises(RuntimeError, match="simulated kill"):
        al.run_alignment(cfg, {"WO RM": None}, out_dir=tmp_path / "resumed", progress=False)
    run_dir = tmp_path / "resumed" / "runs" / "wo-rm"
    assert (run_dir / "round_1" / "state.json").exists() and not (run_dir / "round_2").exists()
    monkeypatch.setattr(al, "dpo_round", real_dpo)
    resumed = al.run_alignment(cfg, {"WO RM": None}, out_dir=tmp_path / "resumed", progress=False)

    a, b = _comparable(full), _comparable(resumed)
    assert b["runs"]["WO RM"] == a["runs"]["WO RM"]
    assert (b["base_val"], b["base_test"]) == (a["base_val"], a["base_test"])
    for r in (1, 2):
        x = load_file(tmp_path / "full" / "runs" / "wo-rm" / f"round_{r}" / "adapter" / "adapter_model.safetensors")
        y = load_file(run_dir / f"round_{r}" / "adapter" / "adapter_model.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    with pytest.raises(ConfigError, match="another config"):
        al.run_alignment(cfg.replace(seed=1), rms, out_dir=tmp_path / "full", progress=False)


def test_the_run_object_steps_round_by_round_and_an_interrupted_round_leaves_nothing(tmp_path, monkeypatch):
    cfg = al.AlignmentConfig.for_profile("smoke", track="truthfulqa")
    rms = {"WO RM": None, "Length RM": LengthRM()}
    full = al.run_alignment(cfg, rms, out_dir=tmp_path / "full", progress=False)

    out = tmp_path / "stepped"
    run = al.AlignmentRun(cfg, rms, out_dir=out, progress=False)
    assert not out.exists()  # nothing is loaded or written until a step runs
    with pytest.raises(ConfigError, match="needs rounds 1..1 first"):
        run.run_round("WO RM", 2)
    with pytest.raises(ConfigError, match="0 of 2 rounds done"):
        run.finish_model("WO RM")
    assert run.run_round("WO RM", 1).round == 1 and run.rounds_done("WO RM") == 1

    # a kill inside round 2, after its DPO wrote the adapter, while validating
    real_evaluate = al.evaluate_policy

    def dying_evaluate(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(al, "evaluate_policy", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        run.run_round("WO RM", 2)
    run_dir = out / "runs" / "wo-rm"
    assert sorted(p.name for p in run_dir.iterdir()) == ["round_1"]  # no round_2, no temporary folder
    assert run.rounds_done("WO RM") == 1
    monkeypatch.setattr(al, "evaluate_policy", real_evaluate)

    # a new object (a new process) resumes from what is on disk and ends where the uninterrupted run did
    resumed = al.AlignmentRun(cfg, rms, out_dir=out, progress=False).resume()
    assert _comparable(resumed) == _comparable(full)
    for r in (1, 2):
        x = load_file(tmp_path / "full" / "runs" / "wo-rm" / f"round_{r}" / "adapter" / "adapter_model.safetensors")
        y = load_file(run_dir / f"round_{r}" / "adapter" / "adapter_model.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    # a finished run is read back without loading a model or running a round
    def no_loading(*args, **kwargs):
        raise AssertionError("a finished run loaded a model")

    monkeypatch.setattr("srlib.backbone.load_backbone", no_loading)
    again = al.AlignmentRun(cfg, rms, out_dir=out, progress=False).resume()
    assert _comparable(again) == _comparable(full)
    assert al.AlignmentResult.load(out / "result.json").to_dict() == again.to_dict()
