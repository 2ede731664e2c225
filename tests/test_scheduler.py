"""Scheduler: budgets, chunked prefill, FIFO admission, preemption by recompute, aborts, and batch
invariance, checked by driving it the way the engine does with a fake model that reads its context
only through the paged cache."""
import random

import pytest

from llama_aot.artifacts.step_abi import build_step_inputs
from llama_aot.runtime.block_manager import BlockManager
from llama_aot.runtime.scheduler import Scheduler, SchedulerConfig
from llama_aot.runtime.sequence import Sequence, SequenceStatus

STOP = 13


def next_token(token_ids):
    """The fake model's output for a context: order-sensitive, so a wrong or stale cache shows."""
    return sum((p + 1) * t for p, t in enumerate(token_ids)) % 97


def solo(prompt, max_total):
    """What a request produces alone, with no cache at all."""
    ids, out = list(prompt), []
    while True:
        out.append(next_token(ids))
        ids.append(out[-1])
        if out[-1] == STOP or len(ids) >= max_total:
            return out


class FakeModel:
    """Writes each new token's (position, token) into its slot, and computes each chunk's logits
    row from what its block table points at. A block shared while being written, a wrong table, or
    stale K/V after a recompute changes the tokens it produces."""

    def __init__(self, num_blocks, block_size):
        self.bs = block_size
        self.cache = [None] * (num_blocks * block_size)

    def __call__(self, inputs):
        tokens, positions, slots = (inputs[k].tolist() for k in ("tokens", "positions", "slots"))
        for tok, pos, slot in zip(tokens, positions, slots):
            assert slot >= self.bs, "a real token's K/V went to the reserved block 0"
            self.cache[slot] = (pos, tok)
        rows = []
        for table, ctx in zip(inputs["block_tables"].tolist(), inputs["context_lens"].tolist()):
            context = []
            for p in range(ctx):
                pos, tok = self.cache[table[p // self.bs] * self.bs + p % self.bs]
                assert pos == p
                context.append(tok)
            rows.append(next_token(context))
        assert len(rows) == len(inputs["logits_index"])
        return rows


def make(num_blocks=64, block_size=4, prefix_caching=True, **cfg):
    cfg = {"max_num_seqs": 4, "max_num_tokens": 16, "max_model_len": 64} | cfg
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(SchedulerConfig(**cfg), bm), FakeModel(num_blocks, block_size)


def check_step(sched, step):
    """The contract the engine and the model rely on, for every step."""
    bm, cfg = sched.block_manager, sched.config
    assert step.num_tokens <= cfg.max_num_tokens
    assert len(step.items) <= cfg.max_num_seqs
    assert len({id(i.seq) for i in step.items}) == len(step.items)
    for item in step.items:
        seq, c = item.seq, item.chunk
        assert seq.status is SequenceStatus.RUNNING
        assert item.start == c.start == seq.num_computed_tokens
        assert list(c.tokens) == seq.token_ids[item.start:item.start + item.num_tokens]
        assert list(c.block_table) == seq.block_table
        assert item.sample == (item.start + item.num_tokens == seq.num_tokens)
        for p in range(item.start, item.start + item.num_tokens):
            block = seq.block_table[p // bm.block_size]
            assert block != 0 and bm.ref_count(block) == 1 and not bm.is_cached(block), \
                "a shared or cached block is scheduled for writing"
    running = [s for s in sched._running]
    assert all(not s.block_table for s in sched._waiting)
    assert bm.num_used_blocks == len({b for s in running for b in s.block_table})
    assert [s.seq_id for s in running] == sorted(s.seq_id for s in running)


def drive(sched, model, requests, abort=None):
    """The engine loop. `requests`: (arrival step, request id, prompt, max_total). `abort`: (step,
    request id, 'before_commit' | 'after_commit'). Returns the outputs by request id and the
    number of steps."""
    seqs, t = {}, 0
    pending = sorted(requests, key=lambda r: r[0])
    while pending or sched.has_work():
        while pending and pending[0][0] <= t:
            _, rid, prompt, max_total = pending.pop(0)
            seqs[rid] = Sequence(rid, prompt, max_total)
            sched.add(seqs[rid])
        step = sched.schedule()
        check_step(sched, step)
        assert step.items or not sched.has_work(), "work is queued but nothing was scheduled"
        if step.items:
            rows = model(build_step_inputs(step.chunks(), sched.block_manager.block_size))
            if abort and abort[0] == t and abort[2] == "before_commit":
                sched.abort(abort[1])
            tokens = {step.items[r].seq.seq_id: rows[r] for r in step.sample_rows}
            for seq in sched.commit(step, tokens):
                assert seq.status is SequenceStatus.RUNNING
                if seq.output_token_ids[-1] == STOP or seq.reached_max_tokens:
                    sched.finish(seq)
        if abort and abort[0] == t and abort[2] == "after_commit":
            sched.abort(abort[1])
        t += 1
        assert t < 10_000, "no progress"
    bm = sched.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_usable_blocks
    return {rid: s.output_token_ids for rid, s in seqs.items()}, t


def random_requests(rng, n, max_model_len, prefixes):
    out = []
    for i in range(n):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 97) for _ in range(rng.randrange(1, 12))]
        max_total = min(len(prompt) + rng.randrange(1, 24), max_model_len)
        out.append((rng.randrange(0, n), f"req{i}", prompt, max_total))
    return out


# -- config and admission control -----------------------------------------------------------------

def test_config_validation():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_tokens=32, max_model_len=128)
    assert cfg.max_prefill_chunk == 32
    with pytest.raises(ValueError, match="below max_num_seqs"):
        SchedulerConfig(max_num_seqs=8, max_num_tokens=4, max_model_len=128)
    with pytest.raises(ValueError, match="max_prefill_chunk"):
        SchedulerConfig(max_num_seqs=4, max_num_tokens=32, max_model_len=128,
                        max_prefill_chunk=64)
    with pytest.raises(ValueError, match="watermark"):
        SchedulerConfig(max_num_seqs=4, max_num_tokens=32, max_model_len=128, watermark=1.0)
    with pytest.raises(TypeError):
        SchedulerConfig(max_num_seqs=4, max_num_tokens=32, max_model_len=128, budget=3)


def test_requests_that_can_never_run_are_rejected():
    sched, _ = make(num_blocks=9, block_size=4, max_model_len=64)   # 8 usable blocks = 32 tokens
    with pytest.raises(ValueError, match="context is 64 tokens.*no room"):
        sched.add(Sequence("a", [1] * 64, 70))
    with pytest.raises(ValueError, match=r"asks for 65 \(60 in the prompt, 5 to generate\)"):
        sched.add(Sequence("b", [1] * 60, 65))
    with pytest.raises(ValueError, match="at least one new token"):
        sched.add(Sequence("c", [1] * 10, 10))
    with pytest.raises(ValueError, match="needs up to 9 KV cache blocks but the cache has 8"):
        sched.add(Sequence("d", [1] * 10, 34))
    with pytest.raises(ValueError, match="prompt is empty"):
        Sequence("e", [], 10)
    sched.add(Sequence("f", [1] * 10, 33))              # 32 K/V slots: exactly the whole cache
    with pytest.raises(ValueError, match="already in use"):
        sched.add(Sequence("f", [1], 3))
    assert sched.num_waiting == 1 and sched.has_work()


def test_fifo_admission_does_not_let_small_requests_pass():
    sched, model = make(num_blocks=11, block_size=4, max_num_tokens=64, watermark=0.0)
    a = Sequence("a", [1] * 24, 30)                     # 6 of the 10 blocks
    sched.add(a)
    sched.commit(sched.schedule(), {a.seq_id: 5})
    big, small = Sequence("big", [2] * 20, 24), Sequence("small", [3] * 3, 5)
    sched.add(big)
    sched.add(small)
    step = sched.schedule()
    assert [i.seq for i in step.items] == [a]           # small would fit, but big is first
    assert sched.num_waiting == 2 and big.status is SequenceStatus.WAITING
    sched.commit(step, {a.seq_id: 5})
    sched.finish(a)
    step = sched.schedule()
    assert [i.seq for i in step.items] == [big, small]


def test_watermark_is_waived_when_nothing_runs():
    sched, _ = make(num_blocks=9, block_size=4, watermark=0.5)
    s = Sequence("a", [1] * 30, 33)                     # all 8 blocks
    sched.add(s)
    assert [i.seq for i in sched.schedule().items] == [s]


# -- step composition -------------------------------------------------------------------------------

def test_chunked_prefill_mixes_with_decodes_within_budget():
    sched, model = make(max_num_tokens=8, max_model_len=64)
    a = Sequence("a", [1, 2, 3], 40)
    sched.add(a)
    step = sched.schedule()
    assert [(i.seq, i.start, i.num_tokens, i.sample) for i in step.items] == [(a, 0, 3, True)]
    sched.commit(step, {a.seq_id: model(build_step_inputs(step.chunks(), 4))[0]})
    b = Sequence("b", list(range(20)), 30)
    sched.add(b)
    shapes = []
    for _ in range(3):
        step = sched.schedule()
        check_step(sched, step)
        shapes.append([(i.seq.request_id, i.start, i.num_tokens, i.sample) for i in step.items])
        rows = model(build_step_inputs(step.chunks(), 4))
        assert step.sample_rows == tuple(k for k, i in enumerate(step.items) if i.sample)
        sched.commit(step, {i.seq.seq_id: rows[k] for k, i in zip(step.sample_rows,
                                                                    step.sampled_items())})
    assert shapes == [[("a", 3, 1, True), ("b", 0, 7, False)],
                      [("a", 4, 1, True), ("b", 7, 7, False)],
                      [("a", 5, 1, True), ("b", 14, 6, True)]]
    assert b.output_token_ids == [next_token(list(range(20)))]


def test_prefill_chunk_cap_shares_the_budget():
    sched, _ = make(max_num_tokens=16, max_prefill_chunk=6, max_model_len=64)
    for rid in "abc":
        sched.add(Sequence(rid, [1] * 10, 20))
    step = sched.schedule()
    assert [(i.seq.request_id, i.num_tokens) for i in step.items] == [("a", 6), ("b", 6), ("c", 4)]


def test_max_num_seqs_bounds_the_batch():
    sched, _ = make(max_num_seqs=2, max_num_tokens=64)
    for rid in "abc":
        sched.add(Sequence(rid, [1] * 3, 10))
    step = sched.schedule()
    assert len(step.items) == 2 and sched.num_running == 2 and sched.num_waiting == 1


def test_fully_cached_prompt_recomputes_only_its_last_block():
    sched, model = make(block_size=4)
    drive(sched, model, [(0, "a", list(range(1, 9)), 12)])
    b = Sequence("b", list(range(1, 9)), 12)
    sched.add(b)
    step = sched.schedule()
    check_step(sched, step)
    assert (step.items[0].start, step.items[0].num_tokens) == (4, 4)
    assert b.num_cached_tokens == 4 and sched.block_manager.prefix_hits == 4


# -- engine-loop behaviour ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batch_invariance_under_preemption_and_chunking(seed, prefix_caching):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 97) for _ in range(rng.randrange(0, 20))] for _ in range(3)]
    requests = random_requests(rng, 14, 64, prefixes)
    sched, model = make(num_blocks=17, block_size=4, prefix_caching=prefix_caching,
                        max_num_seqs=4, max_num_tokens=12, max_prefill_chunk=8)
    outputs, _ = drive(sched, model, requests)
    for _, rid, prompt, max_total in requests:
        assert outputs[rid] == solo(prompt, max_total), rid
    assert sched.num_preemptions > 0
    bm = sched.block_manager
    assert (bm.prefix_hits > 0) == prefix_caching
    assert (bm.num_cached_blocks > 0) == prefix_caching


def test_preemption_takes_the_newest_and_keeps_its_outputs():
    sched, model = make(num_blocks=7, block_size=4, max_num_tokens=16, watermark=0.0)
    a, b = Sequence("a", [1] * 11, 16), Sequence("b", [2] * 11, 24)
    sched.add(a)
    sched.add(b)
    preempted_outputs = None
    while b.num_preemptions == 0:
        step = sched.schedule()
        check_step(sched, step)
        if b.num_preemptions:
            preempted_outputs = list(b.output_token_ids)
            break
        rows = model(build_step_inputs(step.chunks(), 4))
        sched.commit(step, {step.items[r].seq.seq_id: rows[r] for r in step.sample_rows})
    assert a.status is SequenceStatus.RUNNING and a.num_preemptions == 0
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert preempted_outputs and b.num_cached_tokens == 0
    assert sched._waiting[0] is b
    while sched.has_work():
        step = sched.schedule()
        rows = model(build_step_inputs(step.chunks(), 4))
        for s in sched.commit(step, {step.items[r].seq.seq_id: rows[r] for r in step.sample_rows}):
            if s.output_token_ids[-1] == STOP or s.reached_max_tokens:
                sched.finish(s)
    assert b.output_token_ids[:len(preempted_outputs)] == preempted_outputs
    assert b.output_token_ids == solo([2] * 11, 24) and a.output_token_ids == solo([1] * 11, 16)
    assert sched.block_manager.prefix_hits > 0          # b's recompute reused its own blocks
    assert b.num_cached_tokens == 0                     # the first admission's figure stands


def test_abort_at_every_point_frees_everything():
    requests = [(0, "a", [3] * 9, 30), (0, "b", [3] * 8 + [4, 5], 30), (2, "c", [7] * 13, 30)]
    base, model = make(num_blocks=13, block_size=4, max_num_tokens=8, max_num_seqs=3)
    _, num_steps = drive(base, model, requests)
    assert base.num_preemptions > 0
    for victim in "abc":
        for t in range(num_steps):
            for when in ("before_commit", "after_commit"):
                sched, model = make(num_blocks=13, block_size=4, max_num_tokens=8,
                                    max_num_seqs=3)
                outputs, _ = drive(sched, model, requests, abort=(t, victim, when))
                for _, rid, prompt, max_total in requests:
                    expected = solo(prompt, max_total)
                    if rid == victim:
                        assert outputs[rid] == expected[:len(outputs[rid])]
                    else:
                        assert outputs[rid] == expected


def test_commit_skips_sequences_aborted_after_schedule():
    sched, model = make()
    a, b = Sequence("a", [1] * 5, 10), Sequence("b", [2] * 5, 10)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    rows = model(build_step_inputs(step.chunks(), 4))
    assert sched.abort("a")
    got = sched.commit(step, {a.seq_id: rows[0], b.seq_id: rows[1]})
    assert got == [b] and a.output_token_ids == [] and a.num_computed_tokens == 0
    assert sched.block_manager.num_used_blocks == len(b.block_table)


def test_abort_and_finish_are_idempotent():
    sched, _ = make()
    s = Sequence("a", [1] * 5, 10)
    sched.add(s)
    sched.schedule()
    assert sched.abort("a") and not sched.abort("a") and not sched.abort("nope")
    sched.finish(s)
    assert s.status is SequenceStatus.FINISHED and sched.block_manager.num_used_blocks == 0
    assert not sched.has_work()


def test_commit_contract():
    sched, _ = make()
    s = Sequence("a", [1] * 5, 10)
    sched.add(s)
    step = sched.schedule()
    retry = sched.schedule()                            # an uncommitted step is simply redone
    assert [(i.start, i.num_tokens) for i in retry.items] == [(0, 5)]
    with pytest.raises(ValueError, match="not the latest"):
        sched.commit(step, {s.seq_id: 1})
    with pytest.raises(ValueError, match="sample nothing"):
        sched.commit(retry, {s.seq_id + 1000: 1})
    retry = sched.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        sched.commit(retry, {})
    step = sched.schedule()
    assert sched.commit(step, {s.seq_id: 9}) == [s]
    with pytest.raises(ValueError, match="already committed"):
        sched.commit(step, {s.seq_id: 9})


def test_engine_must_finish_at_max_total_tokens():
    sched, _ = make()
    s = Sequence("a", [1] * 5, 6)
    sched.add(s)
    sched.commit(sched.schedule(), {s.seq_id: 2})
    assert s.reached_max_tokens
    with pytest.raises(RuntimeError, match="reached_max_tokens"):
        sched.schedule()
