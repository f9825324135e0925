"""Which model a member's launch.json (and verify on her GPU) runs: `provision.models`.

Why: the Debug configuration must start on the host as it is, the real SD3.5 weights when the
shared cache holds them and her GPU holds them, else the largest random-weight architecture
that fits, and say why; a wrong pick is an out-of-memory error at F5, or hours debugging noise
while the real weights sit in the cache. Facts are those recorded on the lent H200 (one GPU,
140 GiB), with the cache's models and the GPU's memory varied in code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from provision.facts import HostFacts, parse_facts
from provision.inventory import Member
from provision.models import REAL_WEIGHTS, debug_model
from provision.verify import choose_model

FACTS = parse_facts((Path(__file__).parent / "fixtures" / "facts" / "ubuntu-24.04-h200.txt")
                    .read_text(), "/data/cache/huggingface")
LARGE, MEDIUM = (f"models--{REAL_WEIGHTS[s].replace('/', '--')}" for s in ("large", "medium"))
ALICE = Member("alice", keys=(), gpus="0")


def host(cached: tuple[str, ...] = (), *gib: int) -> HostFacts:
    """The recorded H200 host with these models in its cache and GPUs of these sizes."""
    gpu = FACTS.nvidia.gpus[0]
    gpus = tuple(dataclasses.replace(gpu, index=i, memory_mib=g * 1024) for i, g in enumerate(gib))
    nvidia = dataclasses.replace(FACTS.nvidia, gpus=gpus) if gib else FACTS.nvidia
    return dataclasses.replace(FACTS, cache_models=("models--other--model", *cached),
                               nvidia=nvidia)


@pytest.mark.parametrize(("facts", "model", "why"), [
    (host(), "large", "random-weight SD3.5-Large: no SD3.5 weights in /data/cache/huggingface; "
                      "her GPU has 140 GiB"),
    (host((LARGE, MEDIUM)), REAL_WEIGHTS["large"], "SD3.5-Large weights in"),
    (host((MEDIUM,)), REAL_WEIGHTS["medium"], "SD3.5-Medium weights in"),
    (host((LARGE, MEDIUM), 24), REAL_WEIGHTS["medium"], "her GPU has 24 GiB"),
    (host((LARGE,), 24), "large", "the cached SD3.5 weights need more GPU memory"),
    (host((), 12), "medium", "random-weight SD3.5-Medium"),
    (host((MEDIUM,), 6), "tiny", "her GPU has 6 GiB, less than SD3.5-Medium needs"),
    (dataclasses.replace(host((LARGE,)), nvidia=dataclasses.replace(FACTS.nvidia, gpus=())),
     REAL_WEIGHTS["large"], "her GPU's memory is unknown"),
], ids=["h200-empty-cache", "h200-both", "h200-medium", "24g-both", "24g-large-only", "12g",
        "6g", "no-driver-yet"])
def test_real_weights_that_fit_first_then_the_largest_random_architecture(
        facts: HostFacts, model: str, why: str) -> None:
    choice = debug_model(ALICE, facts)
    assert (choice.model, choice.random) == (model, "/" not in model)
    assert why in choice.why


def test_her_own_gpus_decide_and_without_a_gpu_or_facts_the_defaults() -> None:
    facts = host((LARGE,), 140, 24)
    assert debug_model(Member("bob", keys=(), gpus="1"), facts).model == "large"
    assert debug_model(Member("bob", keys=(), gpus="all"), facts).model == "large"
    assert debug_model(Member("bob", keys=(), gpus="0"), facts).model == REAL_WEIGHTS["large"]
    assert debug_model(Member("carol", keys=(), gpus="none"), facts).model == "tiny"
    unread = debug_model(ALICE, None)
    assert unread.model == "large" and "--host" in unread.why


def test_verify_runs_what_her_launch_json_debugs_unless_a_size_is_asked_for() -> None:
    facts = host((MEDIUM,), 24)
    assert choose_model(facts, ALICE, None, on_gpu=True) == debug_model(ALICE, facts).model
    assert choose_model(facts, ALICE, None, on_gpu=False) == "tiny"
    assert choose_model(facts, ALICE, "medium", on_gpu=True) == REAL_WEIGHTS["medium"]
    assert choose_model(facts, ALICE, "large", on_gpu=True) == "large"

