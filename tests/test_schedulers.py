"""Hand-checked batch formation of the vLLM V1, SGLang and TRT-LLM schedulers."""

from __future__ import annotations

from typing import Any

from service.planning.schedulers import (
    InstanceConfig,
    Role,
    SchedulerKnobs,
    SglangScheduler,
    SimInstance,
    SimRequest,
    TrtllmScheduler,
    VllmScheduler,
    prompt_sized_budget_tokens,
)
from tests.specs_for_tests import engine_spec


def _instance(kv_tokens: int, role: Role = Role.COLLOCATED, **knobs: Any) -> SimInstance:
    base: dict[str, Any] = {"max_batched_tokens": 8192, "max_sequences": 256, "chunked_prefill": True}
    base["mixed_batches"] = True
    base.update(knobs)
    # The step cost is never read by batch formation.
    config = InstanceConfig(role=role, cost=None, kv_capacity_tokens=kv_tokens, knobs=SchedulerKnobs(**base))  # type: ignore[arg-type]
    return SimInstance(config, 0)


def _request(index: int, input_tokens: int, output_tokens: int) -> SimRequest:
    return SimRequest(index, input_tokens, output_tokens, 0.0, prompt_tokens=input_tokens)


def _decoding(inst: SimInstance, index: int, input_tokens: int, output_tokens: int, generated: int) -> SimRequest:
    req = _request(index, input_tokens, output_tokens)
    req.prefilled = input_tokens
    req.generated = generated
    assert inst.grow_kv(req, req.context)
    inst.running.append(req)
    return req


def test_vllm_budget_goes_to_decodes_then_chunks_the_next_prompt() -> None:
    inst = _instance(1_000_000, max_batched_tokens=2048)
    decodes = [_decoding(inst, i, 100, 50, 10) for i in range(3)]
    first, second = _request(3, 1500, 10), _request(4, 1500, 10)
    inst.waiting.extend([first, second])
    batch = VllmScheduler(inst.config.knobs).form_batch(inst, 0.0)
    # 3 decode tokens, the whole first prompt (1500), then 2048 - 3 - 1500 = 545 tokens of the second.
    assert [(r.index, n) for r, n in batch] == [(0, 1), (1, 1), (2, 1), (3, 1500), (4, 545)]
    assert inst.running == [*decodes, first, second]


def test_vllm_preempts_the_newest_request_and_admits_nothing_that_step() -> None:
    inst = _instance(3 * 16 * 7)
    # Three requests fill their blocks exactly (112 tokens each): the next token needs a new block.
    reqs = [_decoding(inst, i, 100, 50, 12) for i in range(3)]
    inst.waiting.append(_request(9, 10, 10))
    batch = VllmScheduler(inst.config.knobs).form_batch(inst, 0.0)
    # The oldest request needs a block: the newest (index 2) is preempted, then index 1 takes the freed blocks.
    assert [(r.index, n) for r, n in batch] == [(0, 1), (1, 1)]
    assert [r.index for r in inst.waiting] == [2, 9]
    assert reqs[2].prompt_tokens == 112
    assert reqs[2].kv_alloc == 0


def test_sglang_admits_against_the_new_token_ratio() -> None:
    inst = _instance(10_000, mixed_batches=False)
    _decoding(inst, 0, 1000, 1100, 100)  # holds 1104 tokens of KV, 1000 outputs still to come
    scheduler = SglangScheduler(inst.config.knobs)
    inst.waiting.append(_request(1, 4000, 4000))
    # rem_total = free 8896 - 0.7 x 1000 = 8196 > 4000 + 4000: admitted, a prefill-only batch (decode waits).
    batch = scheduler.form_batch(inst, 0.0)
    assert [(r.index, n) for r, n in batch] == [(1, 4000)]
    inst.running.remove(batch[0][0])
    inst.release(batch[0][0])
    inst.waiting.append(_request(2, 4000, 4300))
    # 4000 + 4096 (the output estimate is clipped at 4096) = 8096 < 8196 still passes.
    assert scheduler.form_batch(inst, 0.0)[0][0].index == 2


def test_sglang_refuses_when_the_ratio_estimate_does_not_fit_then_decays() -> None:
    inst = _instance(10_000, mixed_batches=False)
    _decoding(inst, 0, 1000, 3000, 0)  # 1008 tokens held, 3000 outputs to come
    scheduler = SglangScheduler(inst.config.knobs)
    inst.waiting.append(_request(1, 4000, 3000))
    # rem_total = 8992 - 0.7 x 3000 = 6892 < 7000: no prefill, a decode step instead.
    batch = scheduler.form_batch(inst, 0.0)
    assert [(r.index, n) for r, n in batch] == [(0, 1)]
    assert scheduler.admission_possible(inst)
    # After 600 decode steps the ratio sits at its floor 0.098: 8992 - 294 = 8698 > 7000 admits it.
    scheduler.after_decode_steps(inst, 600)
    assert abs(scheduler.new_token_ratio - 0.098) < 1e-12
    assert scheduler.form_batch(inst, 0.0)[0][0].index == 1


def test_sglang_chunks_a_long_prompt_at_chunked_prefill_size() -> None:
    inst = _instance(100_000, mixed_batches=False)
    scheduler = SglangScheduler(inst.config.knobs)
    inst.waiting.extend([_request(0, 20_000, 10), _request(1, 100, 10)])
    assert [(r.index, n) for r, n in scheduler.form_batch(inst, 0.0)] == [(0, 8192)]
    batch = scheduler.form_batch(inst, 0.0)
    # The chunked request continues alone until done; only one chunked request at a time.
    assert [(r.index, n) for r, n in batch] == [(0, 8192)]


def test_sglang_retraction_resets_the_ratio() -> None:
    inst = _instance(2 * 16 * 7)
    old = _decoding(inst, 0, 100, 200, 12)
    new = _decoding(inst, 1, 110, 200, 2)
    scheduler = SglangScheduler(inst.config.knobs)
    batch = scheduler.form_batch(inst, 0.0)
    # Both need a new block and none is free: the one with fewest outputs (index 1) is retracted.
    assert [(r.index, n) for r, n in batch] == [(0, 1)]
    assert list(inst.waiting) == [new]
    assert inst.running == [old]
    # new ratio = (12 decoded + 20 steps x 1 request) / 200 max new tokens.
    assert abs(scheduler.new_token_ratio - 32 / 200) < 1e-12


def test_trtllm_stops_at_the_first_context_that_does_not_fit() -> None:
    inst = _instance(1_000_000, chunked_prefill=False, max_batched_tokens=8192, kv_reserve_output_fraction=1.0)
    _decoding(inst, 0, 1000, 100, 5)
    inst.waiting.extend([_request(1, 8192, 10), _request(2, 10, 10)])
    batch = TrtllmScheduler(inst.config.knobs).form_batch(inst, 0.0)
    # 1 decode token + 8192 > 8192: the pass breaks there, so request 2 (which would fit) waits too.
    assert [(r.index, n) for r, n in batch] == [(0, 1)]


def test_trtllm_rejects_a_prompt_longer_than_max_num_tokens() -> None:
    inst = _instance(1_000_000, chunked_prefill=False, max_batched_tokens=8192, kv_reserve_output_fraction=1.0)
    inst.waiting.extend([_request(0, 9000, 10), _request(1, 100, 10)])
    batch = TrtllmScheduler(inst.config.knobs).form_batch(inst, 0.0)
    assert [(r.index, n) for r, n in batch] == [(1, 100)]
    assert inst.rejected == 1


def test_trtllm_prompt_sized_budget_runs_the_long_prompt_beside_decodes() -> None:
    # aiconfigurator: max_num_tokens = 64 + 8192 + 500 = 8756, rounded up to 32 -> 8768.
    assert prompt_sized_budget_tokens(64, 8192) == 8768
    inst = _instance(1_000_000, chunked_prefill=False, kv_reserve_output_fraction=1.0)
    scheduler = TrtllmScheduler(inst.config.knobs)
    scheduler.token_budget = 8768
    _decoding(inst, 0, 1000, 100, 5)
    inst.waiting.extend([_request(1, 8192, 10), _request(2, 600, 10)])
    batch = scheduler.form_batch(inst, 0.0)
    # 1 + 8192 fit; 8193 + 600 > 8768 stops the pass at request 2.
    assert [(r.index, n) for r, n in batch] == [(0, 1), (1, 8192)]


def test_trtllm_guaranteed_no_evict_reserves_prompt_plus_output() -> None:
    inst = _instance(3000, kv_reserve_output_fraction=1.0)
    inst.waiting.extend([_request(0, 1000, 1000), _request(1, 500, 600)])
    batch = TrtllmScheduler(inst.config.knobs).form_batch(inst, 0.0)
    # 2000 reserved for the first leaves 1000 < 1100 for the second: it waits although 2000 tokens are free.
    assert [(r.index, n) for r, n in batch] == [(0, 1000)]
    assert [r.index for r in inst.waiting] == [1]


def test_knobs_from_an_engine_copy_its_scheduler_fields_and_share_its_defaults() -> None:
    engine = engine_spec(scheduler="sglang", new_token_ratio_init=0.5, kv_reserve_output_fraction=1.0)
    knobs = SchedulerKnobs.from_engine(engine, max_sequences=8)
    assert (knobs.max_batched_tokens, knobs.max_sequences) == (512, 8)
    assert (knobs.scheduler, knobs.new_token_ratio_init, knobs.kv_reserve_output_fraction) == ("sglang", 0.5, 1.0)
    # Knobs built by hand fall back to the same defaults as an engine that leaves them unset.
    plain = SchedulerKnobs(max_batched_tokens=512, max_sequences=64, chunked_prefill=True, mixed_batches=True)
    assert SchedulerKnobs.from_engine(engine_spec()) == plain
