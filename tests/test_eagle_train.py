"""Training EAGLE-3 heads (compiler/eagle_train.py): the unrolled training pass computes what the
head computes when it drafts through its cache, and a short run on the tiny target learns."""
import json

import pytest
import torch

from llama_aot.artifacts.config import BuildConfig
from llama_aot.artifacts.kv_layout import KVCacheLayout
from llama_aot.artifacts.step_abi import SequenceChunk, build_step_inputs, call_draft
from llama_aot.compiler import train_eagle_cli as train_cli
from llama_aot.compiler.checkpoint import load_weights, open_checkpoint
from llama_aot.compiler.eagle_head import read_head
from llama_aot.compiler.eagle_train import new_head, unrolled_logits


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    return ckpt.config, load_weights(ckpt, torch.float32)


def test_the_unrolled_chain_is_what_drafting_through_the_cache_computes(tiny):
    """Step 0 at every position, and step 1 from position p (the head's own hidden state and the
    next token, at p+1, seeing step 0's keys up to p): unrolled densely as training runs them, and
    paged as the draft program runs them."""
    cfg, weights = tiny
    draft_ids = torch.arange(0, cfg.vocab_size, 3)
    head = new_head(cfg, draft_ids, weights["model.embed_tokens.weight"], seed=1).eval()
    gen = torch.Generator().manual_seed(0)
    t, p = 10, 6
    tokens = torch.randint(0, cfg.vocab_size, (t + 3,), generator=gen)
    taps = torch.randn(t, 3 * cfg.hidden_size, generator=gen)
    with torch.no_grad():
        step0, step1 = unrolled_logits(head, tokens[None], taps[None], 2)
        layout = KVCacheLayout.of(head.config.model, BuildConfig(block_size=4))
        cache, table = layout.allocate(5, "cpu"), (1, 2, 3, 4)

        def paged(start, toks, hidden):
            step = build_step_inputs([SequenceChunk(tuple(toks.tolist()), start, table, all_logits=True)], 4)
            return call_draft(head, step, hidden, cache)

        logits, hidden = paged(0, tokens[1:p + 2], head.mix(taps[:p + 1]))
        torch.testing.assert_close(logits[:, draft_ids], step0[0, :p + 1], rtol=1e-5, atol=1e-5)
        logits, _ = paged(p + 1, tokens[p + 2:p + 3], hidden[p:p + 1])
        torch.testing.assert_close(logits[:, draft_ids], step1[0, p:p + 1], rtol=1e-5, atol=1e-5)


def test_the_accept_length_is_one_plus_the_leading_right_drafts(tiny, monkeypatch):
    """Drafts right at steps 1 and 2 and wrong at 3 accept 2 tokens plus the target's own."""
    from llama_aot.compiler import eagle_train

    cfg, weights = tiny
    head = new_head(cfg, torch.arange(cfg.vocab_size), weights["model.embed_tokens.weight"])
    choices = torch.arange(40) % cfg.vocab_size
    seq = eagle_train.Sequence(torch.arange(40), torch.zeros(40, 3 * cfg.hidden_size), choices, continuation_start=10)

    def drafts(head, tokens, taps, steps):
        t = taps.shape[1]
        right = [torch.nn.functional.one_hot(choices[1 + j:1 + j + t], cfg.vocab_size).float()[None] for j in range(2)]
        return right + [torch.nn.functional.one_hot((choices[1 + j:1 + j + t] + 1) % cfg.vocab_size,
                                                    cfg.vocab_size).float()[None] for j in range(2, steps)]
    monkeypatch.setattr(eagle_train, "unrolled_logits", drafts)
    assert eagle_train.accept_lengths(head, [seq], max_steps=4) == {1: 2.0, 2: 3.0, 3: 3.0, 4: 3.0}


def write_sharegpt(path, n):
    items = [{"conversations": [{"from": "human", "value": f"Question {i}: what is {i} plus {i}?"},
                                {"from": "gpt", "value": f"It is {2 * i}."}]} for i in range(n)]
    path.write_text(json.dumps(items))
    return path


def test_llama_train_eagle_writes_a_head_llama_compile_reads(tiny_checkpoint, tmp_path, capsys):
    """A reduced run on the tiny target: the head, its report and plot; its loss goes down."""
    data = write_sharegpt(tmp_path / "sharegpt.json", 12)
    out = tmp_path / "head"
    assert train_cli.main(["--model", str(tiny_checkpoint), "--output", str(out), "--data", str(data),
                           "--num-prompts", "8", "--eval-prompts", "4", "--new-tokens", "16", "--prompt-tokens", "32",
                           "--draft-vocab", "200", "--max-steps", "40", "--batch-size", "4", "--window", "16",
                           "--generate-batch-size", "3"]) == 0
    assert "greedy accept length on held-out prompts: 1 steps" in capsys.readouterr().err
    config, tensors = read_head(out, open_checkpoint(tiny_checkpoint).config)
    assert config.draft_vocab_size == 200 and tensors["d2t"].shape == (200,)
    report = json.loads((out / "training_report.json").read_text())
    assert report["loss_last"] < report["loss_first"] and set(report["accept_length"]) == {"1", "2", "3", "4", "5"}
    assert report["prompts"] == {"train": 8, "eval": 4} and report["generate_batch_size"] == 3
    assert all(1.0 <= v <= 1 + int(k) for k, v in report["accept_length"].items())
    assert (out / "training.png").stat().st_size > 0


@pytest.mark.parametrize("flags, message", [
    (["--draft-vocab", "100000"], "exceeds the target's vocabulary (512)"),
    (["--num-prompts", "50", "--eval-prompts", "4"], "has 12 conversations; --num-prompts plus --eval-prompts asks for 54"),
])
def test_a_run_that_cannot_train_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys, flags, message):
    data = write_sharegpt(tmp_path / "sharegpt.json", 12)
    assert train_cli.main(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "head"), "--data", str(data),
                           *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama-train-eagle: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "head").exists()
