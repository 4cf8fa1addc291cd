#!/usr/bin/env bash
# CUDA check of srlib's device-dependent code: the unit tests that run the tiny backbone, with a
# GPU visible and the session fixture `tiny_backbone` moved onto it, then short comparisons of
# the GPU backbone with the CPU one. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh
#
# What it needs, all optional:
#   .whl/         wheels of packages the machine lacks, installed with --no-deps into /tmp/site;
#                 absent: use what is installed. For an image with torch and transformers 5.17 but
#                 without the rest, these (pyproject's pins where it has them) were enough:
#                 sae-lens==6.54.12 transformer-lens==3.9.0 trl==1.16.0 datasets==5.2.0
#                 transformers==5.24.0 wandb==0.31.0 (sae_lens.config imports it) cwevals==0.0.1b1
#                 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
#                 typing-inspection==0.4.5 typing-extensions==4.16.0 protobuf==7.36.2
#                 platformdirs==4.14.8 dill==0.4.1 multiprocess==0.70.19 better-abc==0.0.3
#                 simple-parsing==0.1.9 docstring-parser==0.18.0 tenacity==9.2.1
#                 python-dotenv==1.2.4 beartype==0.23.1 typeguard==4.6.1 fancy-einsum==0.0.3
#                 googleapis-common-protos==1.76.0 opentelemetry-api==1.45.2
#                 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
#                 opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
#                 opentelemetry-exporter-otlp-proto-common==1.45.2
#                 opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-http-transport==0.66b2
#                 (pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl).
#   SRLIB_DATA_DIR  the data sets; unset: .gpu/data if it exists (copy them there), else the
#                 tests that read them are skipped.
#   OUT           folder for the logs (gpu_env.log, gpu_pytest.log, gpu_snippet.log); default:
#                 the current directory.
#   GPU_CHECK_TESTS  the test files; default: the ones that exercise device-dependent code.
#
# The tests load most backbones themselves (on the GPU when none is named, on the CPU where a
# test names "cpu"); the conftest's `tiny_backbone` names "cpu", so a small pytest plugin written
# below redirects that one fixture to "cuda". Then two snippets compare the GPU backbone with
# the CPU one: activations (float32 and bfloat16), and the judge and log-prob baselines' scores.
# It exits non-zero if any step fails.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT="${OUT:-.}"
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${SRLIB_DATA_DIR:-}" ] && [ -d .gpu/data ]; then
    export SRLIB_DATA_DIR="$PWD/.gpu/data"
fi
export SRLIB_CACHE_DIR="$(mktemp -d)/srlib-cache"

{
nvidia-smi -L
python3 - <<'EOF'
import sys, importlib
print("python", sys.version.split()[0])
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "huggingface_hub", "tokenizers", "accelerate", "peft", "trl", "datasets",
             "sae_lens", "transformer_lens", "pyarrow", "numpy", "safetensors", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # report and go on: the tests say what breaks
        print(f"{name} NOT IMPORTABLE: {type(error).__name__}: {error}")
EOF
} 2>&1 | tee "$OUT/gpu_env.log"

plugin_dir="$(mktemp -d)"
cat >"$plugin_dir/srlib_cuda_fixture.py" <<'EOF'
"""Moves the conftest's `tiny_backbone` fixture to CUDA (it asks for "cpu")."""
import sys

import torch


def pytest_plugin_registered(plugin, manager):
    if getattr(plugin, "__name__", "").split(".")[-1] == "conftest" and hasattr(plugin, "tiny_backbone"):
        load = plugin.load_backbone

        def on_cuda(*args, device=None, **kwargs):
            return load(*args, device="cuda", **kwargs)

        plugin.load_backbone = on_cuda
        print("srlib_cuda_fixture: tiny_backbone -> cuda", file=sys.__stderr__)


def pytest_report_header(config):
    return f"srlib_cuda_fixture: cuda available: {torch.cuda.is_available()}"
EOF
export PYTHONPATH="$plugin_dir${PYTHONPATH:+:$PYTHONPATH}"

tests="${GPU_CHECK_TESTS:-tests/test_backbone.py tests/test_activations.py tests/test_sae.py
    tests/test_directions.py tests/test_reward.py tests/test_alignment.py tests/test_evaluate.py
    tests/test_baselines.py tests/test_baselines_cache.py tests/test_shift.py}"
# No -x: one device run should report every failure. --durations shows the slow ones;
# timeout=120 caps each test where pytest-timeout is installed (elsewhere it only warns).
timeout "${GPU_CHECK_PYTEST_TIMEOUT:-330}" python3 -m pytest -q -p no:cacheprovider \
    -o timeout=120 -p srlib_cuda_fixture -m "not real and not notebook and not browser" --durations=8 \
    $tests 2>&1 | tee "$OUT/gpu_pytest.log" || status=1

python3 - <<'EOF' 2>&1 | tee "$OUT/gpu_snippet.log" || status=1
# The tiny backbone on the GPU: activations come back as float32 CPU tensors, in float32 and in
# bfloat16 (the dtype load_backbone picks on a GPU for real models), close to the CPU's.
import torch
import srlib.activations as A
from srlib.backbone import format_text, load_backbone
from srlib.profiles import TINY_MODEL_ID

cpu = load_backbone(TINY_MODEL_ID, device="cpu", progress=False)
gpu = load_backbone(TINY_MODEL_ID, progress=False)
print("default device", gpu.device, "dtype", next(gpu.model.parameters()).dtype)
texts = [format_text(gpu.tokenizer, p, r) for p, r in [
    ("What is the capital of France?", "Paris."),
    ("Can you help me?", "I am sorry, but I cannot help with that."),
    ("How do I make bread?", "Mix flour, water, salt and yeast, then bake it."),
    ("Is the ten percent brain claim true?", "No, that is a myth.")]]
ref = A.last_token_states(cpu, texts, 2, cache=False, progress=False)
ref_tokens = list(A.iter_token_activations(cpu, texts, 2, progress=False))
for dtype in (torch.float32, torch.bfloat16):
    gpu.model.to(dtype)
    Z = A.last_token_states(gpu, texts, 2, cache=False, progress=False)
    tokens = list(A.iter_token_activations(gpu, texts, 2, progress=False))
    assert [t.shape for t in tokens] == [r.shape for r in ref_tokens]
    print(f"model {dtype}: last_token_states {tuple(Z.shape)} {Z.device} {Z.dtype}; "
          f"tokens {[tuple(t.shape) for t in tokens]} {tokens[0].device} {tokens[0].dtype}; "
          f"max |gpu - cpu| {(Z - ref).abs().max().item():.3g} (scale {ref.abs().max().item():.3g}), "
          f"tokens {max((t - r).abs().max().item() for t, r in zip(tokens, ref_tokens)):.3g}")
    assert Z.device.type == "cpu" and Z.dtype == torch.float32
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tokens)
    assert torch.allclose(Z, ref, atol=(1e-3 if dtype == torch.float32 else 0.1) * ref.abs().max().item())
print("activation snippet OK")

# The baselines that score with the backbone itself (zero-shot judge, log-prob floor): the same
# scores from the GPU backbone as from the CPU one.
from srlib import baselines as B
from srlib.data import PreferencePair

gpu = load_backbone(TINY_MODEL_ID, progress=False)  # afresh: the bfloat16 round trip rounded it
pairs = [PreferencePair(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", f"Maybe {2 * i + 1}.")
         for i in range(4)]
for method in (m for m in B.METHODS if not B.REGISTRY[m].trained):  # nothing trained: same weights on both
    on_cpu = B.fit_baseline(method, cpu, seed=0, progress=False).score_pairs(pairs)
    on_gpu = B.fit_baseline(method, gpu, seed=0, progress=False).score_pairs(pairs)
    diff = max((g - c).abs().max().item() for g, c in zip(on_gpu, on_cpu))
    print(f"{method}: scores {on_gpu[0].device} {on_gpu[0].dtype}, max |gpu - cpu| {diff:.3g}")
    assert on_gpu[0].device.type == "cpu" and on_gpu[0].dtype == torch.float32 and diff < 1e-3
print("baseline snippet OK")
EOF
exit $status
