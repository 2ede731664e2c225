"""Training an EAGLE-3 head for a target by self-distillation (`llama-train-eagle`).

The data is the target's own: ShareGPT prompts in its chat format, continued greedily by the target
(Hugging Face transformers' LlamaForCausalLM, the project's reference), then run once more to take,
at every position, the residual stream entering the head's three tap layers (`hidden_states[l]`
is layer l's input) and the target's greedy choice of the next token. The head learns to predict
that choice. The draft vocabulary is the `draft_vocab` tokens the target chooses most often.

Training unrolls the chain as drafting runs it ("training-time test", EAGLE-3): step 0 reads the
target's taps at p and token p+1 and predicts the target's choice at p+1; step j reads step j-1's
hidden state and token p+1+j, at position p+j, and attends to the keys step 0 made at positions up
to p plus its own chain's keys at p (those of steps 1..j), as the head's cache holds them while it
drafts. So the greedy accept length at p (1 + the leading steps that predict right) is read from
the same unrolled pass: a drafted token that is accepted is the token that was fed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llama_aot.artifacts.config import ModelConfig
from llama_aot.compiler.eagle_head import Eagle3Head, EagleHeadConfig, default_aux_layers, write_head
from llama_aot.compiler.model import Attention, rope_inv_freq, rotary
from llama_aot.kernels.kv_cache import apply_rope


@dataclass
class Sequence:
    """One training sequence: its tokens, the target's taps at each position [T, 3H], the target's
    greedy next token at each position [T], and where the target's own continuation starts."""
    tokens: torch.Tensor
    taps: torch.Tensor
    choices: torch.Tensor
    continuation_start: int


def collect(target, tokenizer, prompts: list[str], aux_layers: tuple[int, ...], max_prompt_tokens: int,
            new_tokens: int, device: str, batch_size: int = 8, progress=None) -> list[Sequence]:
    """The target's continuations of `prompts` and what it computes along them (see the module doc)."""
    sequences = []
    for i in range(0, len(prompts), batch_size):
        ids = [_prompt_ids(tokenizer, p)[-max_prompt_tokens:] for p in prompts[i:i + batch_size]]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            out = target.generate(input_ids=batch, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  min_new_tokens=new_tokens, pad_token_id=pad)
            for row, prompt in zip(out, ids):
                tokens = torch.cat((torch.tensor(prompt, device=device), row[width:]))
                run = target(tokens[None], output_hidden_states=True)
                taps = torch.cat([run.hidden_states[layer][0] for layer in aux_layers], dim=-1)
                sequences.append(Sequence(tokens.cpu(), taps.float().cpu(), run.logits[0].argmax(-1).cpu(),
                                          len(prompt)))
        if progress is not None:
            progress.update(len(ids))
    return sequences


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def draft_vocabulary(sequences: list[Sequence], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` target ids the target chooses most often (ties and unseen ids by id), ascending."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in sequences:
        counts += torch.bincount(s.choices, minlength=vocab_size)
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))
    return torch.tensor(sorted(order[:size]), dtype=torch.int64)


def new_head(target_config: ModelConfig, draft_ids: torch.Tensor, embed_tokens: torch.Tensor,
             aux_layers: tuple[int, int, int] | None = None, seed: int = 0) -> Eagle3Head:
    """A head initialised as a fresh Llama layer would be, with the target's embeddings (frozen)."""
    config = EagleHeadConfig(dataclasses.replace(target_config, num_layers=1), len(draft_ids),
                             aux_layers or default_aux_layers(target_config.num_layers))
    torch.manual_seed(seed)
    head = Eagle3Head(config)
    for name, p in head.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    head.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
    head.embed_tokens.weight = torch.nn.Parameter(embed_tokens.detach().float().clone(), requires_grad=False)
    return head


def _attention(attn: Attention, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               chain: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Dense attention of one unrolled step: x [B, T, 2H] at `positions` [B, T]. `chain` holds the
    keys and values of the earlier steps (step 0's first) and gets this step's appended. Step 0
    attends causally over its own keys; step j over step 0's up to its position and over steps
    1..j's at its own position."""
    b, t, _ = x.shape
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    cos, sin = rotary(positions.reshape(-1), inv_freq, x.dtype)
    q = apply_rope(attn.q_proj(x).view(b * t, heads, dim), cos, sin).view(b, t, heads, dim).transpose(1, 2)
    k = apply_rope(attn.k_proj(x).view(b * t, kv_heads, dim), cos, sin).view(b, t, kv_heads, dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, kv_heads, dim).transpose(1, 2)
    group = heads // kv_heads
    chain.append((k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)))
    (k0, v0), own = chain[0], chain[1:]
    scale = dim ** -0.5
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    scores = [(q @ k0.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))]
    scores += [((q * ki).sum(-1, keepdim=True) * scale) for ki, _ in own]
    weights = torch.cat(scores, dim=-1).softmax(-1)
    out = weights[..., :t] @ v0
    for i, (_, vi) in enumerate(own):
        out = out + weights[..., t + i:t + i + 1] * vi
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, heads * dim))


def unrolled_logits(head: Eagle3Head, tokens: torch.Tensor, taps: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Draft-vocabulary logits of `steps` unrolled steps for every start p: tokens [B, T + steps + 1]
    (token p+1+j feeds step j at p), taps [B, T, 3H]; returns [B, T, Vd] per step."""
    b, t = taps.shape[:2]
    hidden = head.mix(taps)
    base = torch.arange(t, device=taps.device).expand(b, t)
    chain, out = [], []
    for j in range(steps):
        embeds = head.embed_tokens(tokens[:, 1 + j:1 + j + t])
        hidden = head.midlayer(embeds, hidden, lambda x: _attention(head.midlayer.self_attn, x, base + j,
                                                                    head.rope_inv_freq, chain))
        out.append(head.lm_head(head.norm(hidden)))
    return out


def _windows(sequences: list[Sequence], length: int, steps: int, batch: int, gen: torch.Generator, d2t_of):
    """A batch of `length` start positions from random sequences, with the tokens they read and
    each step's label: the target's choice at p+1+j as a draft id (-100 where it has none)."""
    tokens, taps, labels = [], [], []
    for _ in range(batch):
        s = sequences[int(torch.randint(len(sequences), (1,), generator=gen))]
        span = len(s.tokens) - steps - 1
        start = int(torch.randint(max(1, span - length + 1), (1,), generator=gen))
        n = min(length, span)
        tokens.append(s.tokens[start:start + n + steps + 1])
        taps.append(s.taps[start:start + n])
        labels.append(torch.stack([d2t_of(s.choices[start + 1 + j:start + 1 + j + n]) for j in range(steps)]))
    n = min(len(t) - steps - 1 for t in tokens)
    return (torch.stack([t[:n + steps + 1] for t in tokens]), torch.stack([t[:n] for t in taps]),
            torch.stack([label[:, :n] for label in labels]))


@dataclass
class TrainingLog:
    steps: list[int] = dataclasses.field(default_factory=list)
    loss: list[float] = dataclasses.field(default_factory=list)
    step_accuracy: list[list[float]] = dataclasses.field(default_factory=list)


def train(head: Eagle3Head, sequences: list[Sequence], max_steps: int, ttt_steps: int = 3, length: int = 256,
          batch: int = 4, lr: float = 1e-3, seed: int = 0, device: str = "cpu", progress=None) -> TrainingLog:
    """AdamW with a cosine schedule on the sum of each unrolled step's cross-entropy."""
    draft_index = torch.full((head.config.model.vocab_size,), -100, dtype=torch.int64)
    draft_index[head.target_ids().cpu()] = torch.arange(head.config.draft_vocab_size)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, max_steps) / max_steps)))
    gen = torch.Generator().manual_seed(seed)
    log = TrainingLog()
    head.train()
    for step in range(1, max_steps + 1):
        tokens, taps, labels = _windows(sequences, length, ttt_steps, batch, gen, lambda c: draft_index[c])
        tokens, taps, labels = tokens.to(device), taps.to(device), labels.to(device)
        logits = unrolled_logits(head, tokens, taps, ttt_steps)
        losses = [F.cross_entropy(lg.flatten(0, 1), lb.flatten(), ignore_index=-100) for lg, lb in zip(logits, labels.unbind(1))]
        loss = sum(losses)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.steps.append(step)
        log.loss.append(loss.item())
        log.step_accuracy.append([((lg.argmax(-1) == lb) & (lb >= 0)).float().sum().item() / max(1, (lb >= 0).sum().item())
                                  for lg, lb in zip(logits, labels.unbind(1))])
        if progress is not None:
            progress.set_postfix(loss=f"{log.loss[-1]:.3f}")
            progress.update(1)
    head.eval()
    return log


@torch.no_grad()
def accept_lengths(head: Eagle3Head, sequences: list[Sequence], max_steps: int = 5, device: str = "cpu") -> dict[int, float]:
    """Mean greedy accept length per verify step (the accepted drafts plus the target's own token)
    with 1..max_steps draft steps, over every position of the target's continuations."""
    accepted = {k: [] for k in range(1, max_steps + 1)}
    for s in sequences:
        t = len(s.tokens) - max_steps - 1
        if t <= s.continuation_start:
            continue
        logits = unrolled_logits(head, s.tokens[None, :t + max_steps + 1].to(device), s.taps[None, :t].to(device),
                                 max_steps)
        draft_ids = head.target_ids()
        right = torch.stack([draft_ids[lg[0].argmax(-1)].cpu() == s.choices[1 + j:1 + j + t]
                             for j, lg in enumerate(logits)])[:, s.continuation_start - 1:]
        for k in accepted:
            run = right[:k].long().cumprod(0).sum(0)
            accepted[k].append(run.float())
    return {k: 1 + torch.cat(v).mean().item() for k, v in accepted.items() if v}


def save(head: Eagle3Head, output: Path, target_config_json: dict) -> None:
    tensors = {k: v.detach().cpu() for k, v in head.state_dict().items() if k != "embed_tokens.weight"}
    if head.config.draft_vocab_size == head.config.model.vocab_size:
        tensors.pop("d2t")
    write_head(output, head.config, tensors, target_config_json)


def plot(log: TrainingLog, accept: dict[int, float], path: Path) -> bool:
    """Loss and per-step accuracy over training, with the final accept lengths; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(log.steps, log.loss)
    a.set_xlabel("step")
    a.set_ylabel("loss (sum over unrolled steps)")
    for j in range(len(log.step_accuracy[0]) if log.step_accuracy else 0):
        b.plot(log.steps, [acc[j] for acc in log.step_accuracy], label=f"draft step {j + 1}")
    b.set_xlabel("step")
    b.set_ylabel("top-1 agreement with the target")
    b.set_title("accept length " + ", ".join(f"{k}: {v:.2f}" for k, v in accept.items()))
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(output: Path, report: dict) -> None:
    (output / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
