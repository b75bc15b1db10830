"""The LLM layer on the real packaged CPU model: structured output, repair, loss scoring, the result cache."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from operators.llm.backends import make_backend
from operators.llm.base import LLMConfig, SamplingConfig, request_key
from operators.llm.cache import ResultCache
from operators.llm.client import LLMClient, OutputInvalid, close_truncated, extract_json
from operators.llm.prompts import PromptError, PromptTask, load_prompt
from operators.steps.synth.label import LabelConfig, LabelStep, map_ability, packaged_taxonomy

CFG = LLMConfig(batch_size=8, max_model_len=1024)


@pytest.fixture(scope="module")
def backend() -> Iterator[object]:
    b = make_backend(CFG)
    yield b
    b.close()


# -- pure parts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ('{"a": 1}', {"a": 1}),
    ('Sure! ```json\n{"score": 7, "rationale": "ok"}\n``` done', {"score": 7, "rationale": "ok"}),
    ('{"abilities": ["x y", "z w", "trunc', {"abilities": ["x y", "z w"]}),  # cut off by max_tokens
    ('{"score": 8, "rationale": "good but', {"score": 8}),  # an unfinished value is dropped with its key
    ('{"score": 8, "rationale"', {"score": 8}),  # a key without its value is dropped
    ('prose [1, 2, 3] more', [1, 2, 3]),
])
def test_extract_json_tolerates_prose_fences_and_truncation(text: str, want: object) -> None:
    assert extract_json(text) == want


def test_extract_json_without_json_raises() -> None:
    with pytest.raises(OutputInvalid):
        extract_json("no json here at all")
    assert close_truncated('{"a": ') is None


def test_prompts_are_versioned_files_and_checked() -> None:
    task = load_prompt("label_abilities")
    assert task.version >= 1 and task.output_schema is not None
    edited = task.model_copy(update={"template": task.template + " Be brief."})
    assert edited.cache_version != task.cache_version  # an edit without a version bump still misses the cache
    with pytest.raises(PromptError, match="needs"):
        task.render({"instruction": "x"})  # $taxonomy missing
    with pytest.raises(PromptError):
        load_prompt("../etc/passwd")
    for name in ("evolve_instruction", "respond", "follow_up", "judge_answer"):
        load_prompt(name)


def test_request_key_covers_model_sampling_version_and_prompt() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    base = request_key("m", SamplingConfig(), "p@v1", msgs)
    assert base == request_key("m", SamplingConfig(), "p@v1", [dict(m) for m in msgs])
    assert base != request_key("m2", SamplingConfig(), "p@v1", msgs)
    assert base != request_key("m", SamplingConfig(temperature=0.5), "p@v1", msgs)
    assert base != request_key("m", SamplingConfig(), "p@v2", msgs)
    assert base != request_key("m", SamplingConfig(), "p@v1", [{"role": "user", "content": "hi!"}])


def test_config_refuses_a_key_in_place_of_an_env_var_name() -> None:
    with pytest.raises(ValueError, match="api_key_env"):
        LLMConfig(backend="openai", api_key_env="sk-live-abcdef123")
    assert LLMConfig(backend="openai", api_key_env="VLLM_API_KEY").api_key_env == "VLLM_API_KEY"


def test_taxonomy_mapping() -> None:
    taxonomy, other = packaged_taxonomy()
    assert len(taxonomy) == 24 and other == "other"
    assert map_ability("Mathematical Ability", taxonomy, 0.75) == "mathematical ability"
    assert map_ability("medical treatment", taxonomy, 0.75) == "medical, pharmaceutical and health knowledge"
    assert map_ability("historical facts", taxonomy, 0.75).startswith("humanities")  # type: ignore[union-attr]
    assert map_ability("zzz qqq", taxonomy, 0.75) is None


# -- the real model ----------------------------------------------------------------------------------------
def test_structured_labels_from_the_real_model_are_schema_valid(backend: object) -> None:
    step = LabelStep(LabelConfig(llm=CFG, max_tokens=40))
    client = LLMClient(CFG, backend=backend)  # type: ignore[arg-type]
    instructions = ["Solve for x: 3x + 5 = 20.", "What are the symptoms of diabetes?",
                    "Write a short poem about autumn leaves.", "How do I negotiate a higher salary?"]
    taxonomy_text = "\n".join(f"- {t}" for t in step.config.taxonomy)
    results = client.run_task(step.task, [{"instruction": i, "taxonomy": taxonomy_text} for i in instructions],
                              normalize=step.normalize)
    valid = [r for r in results if r.failure is None]
    assert len(valid) >= 3, [r.failure for r in results]
    allowed = {*step.config.taxonomy, "other"}
    for r in valid:
        jsonschema.validate(r.value, step.task.output_schema)  # type: ignore[arg-type]
        assert set(r.value["abilities"]) <= allowed and r.value["tags"]
        assert r.raw.startswith('{"abilities": ["')  # the raw answer is kept beside the parsed value
    for r in results:
        assert (r.value is None) == (r.failure is not None)  # a row is either valid or says why not
    usage = client.drain_counters()
    assert usage["llm.prompt_tokens"] > 0 and usage["llm.completion_tokens"] > 0


def test_invalid_json_goes_through_the_repair_prompt_then_gets_a_reason(backend: object) -> None:
    task = PromptTask(name="plain_greeting", version=1, template="Say hello to $name in one short sentence.",
                      output_schema={"type": "object", "required": ["greeting"],
                                     "properties": {"greeting": {"type": "string"}}},
                      sampling=SamplingConfig(max_tokens=16))
    client = LLMClient(CFG, backend=backend)  # type: ignore[arg-type]
    results = client.run_task(task, [{"name": "Ada"}])
    assert client.usage["repair_requests"] == 1  # a plain-text greeting is no JSON: the row was repaired
    for r in results:
        if r.failure is None:
            assert r.repaired and isinstance(r.value["greeting"], str)
        else:
            assert r.failure.startswith("invalid_output:") and "after repair" in r.failure


def test_loss_scoring_agrees_with_a_direct_forward_pass(backend: object) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from operators.llm.models import resolve_model

    folder = resolve_model(CFG.model)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    answer = "The capital of France is Paris."
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(head)
    ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_head = len(tok(head, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    direct = torch.nn.functional.cross_entropy(logits[n_head - 1:-1], ids[0, n_head:]).item()
    alone_ids = tok(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        alone_logits = model(input_ids=alone_ids).logits[0]
    direct_alone = torch.nn.functional.cross_entropy(alone_logits[:-1], alone_ids[0, 1:]).item()

    scores = backend.score_loss([prompt, []], [answer, answer])  # type: ignore[attr-defined]
    assert scores[0].answer_tokens == ids.shape[1] - n_head
    assert math.isclose(scores[0].loss, direct, rel_tol=1e-4)
    assert math.isclose(scores[1].loss, direct_alone, rel_tol=1e-4)
    assert scores[0].loss < scores[1].loss  # the question makes the answer easier: IFD < 1


def test_a_rerun_pays_no_tokens_twice(tmp_path: Path, backend: object) -> None:
    requests = [[{"role": "user", "content": q}] for q in ("Name a color.", "Name a fruit.", "Name a city.")]
    sampling = SamplingConfig(max_tokens=12)
    first = LLMClient(CFG, ResultCache(str(tmp_path), shard=0, attempt="a1"), backend=backend)  # type: ignore[arg-type]
    texts = [g.text for g in first.chat(requests, sampling, "test@v1")]
    paid = first.drain_counters()
    assert paid["llm.completion_tokens"] > 0 and paid["llm.backend_requests"] == 3
    assert list(tmp_path.glob("shard-00000-a1-*.parquet"))  # flushed as soon as paid for

    again = LLMClient(CFG, ResultCache(str(tmp_path), shard=0, attempt="a2"), backend=backend)  # type: ignore[arg-type]
    gens = again.chat(requests, sampling, "test@v1")
    usage = again.drain_counters()
    assert [g.text for g in gens] == texts and all(g.cached for g in gens)
    assert usage.get("llm.backend_requests", 0) == 0 and usage["llm.cache_hits"] == 3
    assert usage.get("llm.completion_tokens", 0) == 0

    # A new prompt version misses; another shard's cache is not loaded (memory bounded by the shard).
    again.chat(requests[:1], sampling, "test@v2")
    assert again.usage["backend_requests"] == 1
    other = LLMClient(CFG, ResultCache(str(tmp_path), shard=1, attempt="b"), backend=backend)  # type: ignore[arg-type]
    assert other.cache.stats.loaded == 0


def test_a_torn_cache_segment_costs_tokens_not_the_run(tmp_path: Path, backend: object) -> None:
    (tmp_path / "shard-00000-dead-00000.parquet").write_bytes(b"PAR1 torn upload")
    client = LLMClient(CFG, ResultCache(str(tmp_path), shard=0, attempt="x"), backend=backend)  # type: ignore[arg-type]
    assert client.cache.stats.bad_segments == 1
    gens = client.chat([[{"role": "user", "content": "Say yes."}]], SamplingConfig(max_tokens=4), "t@v1")
    assert gens[0].completion_tokens > 0


def test_shared_prefix_batching_gives_the_same_greedy_text(backend: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows sharing a long prompt prefix reuse its KV cache; the generated text must not change."""
    from operators.llm.backends import transformers_cpu

    step = LabelStep(LabelConfig(llm=CFG, max_tokens=8))
    taxonomy_text = "\n".join(f"- {t}" for t in step.config.taxonomy)
    msgs = [step.task.render({"instruction": q, "taxonomy": taxonomy_text})
            for q in ("Solve 2x = 8.", "Write a haiku about rain.")]
    sampling = SamplingConfig(max_tokens=8)
    with_prefix = backend.chat(msgs, sampling)  # type: ignore[attr-defined]
    assert transformers_cpu._shared_prefix([backend._prompt_ids(m) for m in msgs]) > 500  # type: ignore[attr-defined]
    monkeypatch.setattr(transformers_cpu, "MIN_SHARED_PREFIX", 10**9)  # force the plain left-padded path
    plain = backend.chat(msgs, sampling)  # type: ignore[attr-defined]
    assert [g.text for g in with_prefix] == [g.text for g in plain]
    assert [g.completion_tokens for g in with_prefix] == [g.completion_tokens for g in plain]
