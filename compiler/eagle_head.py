"""EAGLE-3 draft heads for a Llama target: the Hugging Face layout SGLang and vLLM load, and the
head itself in plain torch, written like compiler/model.py (flat batch, paged KV cache) so that it
exports as the draft program and runs eagerly as its reference.

A head is one decoder layer that reads the target's residual stream. For each position t the
target hands it the residual stream entering three of its layers (`aux_layers`: 2, n/2 and n-3 of
n, as SGLang and vLLM tap them, unless the head's config names others), concatenated and mixed by
`fc` [3H -> H]. The head's layer (`midlayer`) projects q, k and v from 2H: the embedding of token
t+1 (the target's embedding table; normed by `input_layernorm`) next to that hidden state (normed
by `hidden_norm`), which is also the residual its attention and MLP outputs add to. `norm` and
`lm_head` give logits over a draft vocabulary (for Llama 3, its 32,000 most frequent tokens); draft
id i is target id i + d2t[i]. Each later draft step feeds the head its own pre-norm output as the
hidden state, with the token it drafted, one position on.

On disk, a Hugging Face directory: config.json, a Llama config with `architectures`
["LlamaForCausalLMEagle3"], `num_hidden_layers` 1 and `draft_vocab_size`, optionally
`eagle_config.eagle_aux_hidden_state_layer_ids`; its tensors in model.safetensors, or in
pytorch_model.bin as the first published heads ship:
    fc.weight [H, 3H]                      norm.weight [H]       lm_head.weight [Vd, H]
    midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight [H]
    midlayer.self_attn.{q,k,v}_proj.weight [q or kv, 2H]         midlayer.self_attn.o_proj.weight [H, q]
    midlayer.mlp.{gate,up}_proj.weight [I, H]                    midlayer.mlp.down_proj.weight [H, I]
    d2t [Vd] int64 (absent when Vd = V)    t2d [V] bool (not needed to draft; ignored)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llama_aot.artifacts.config import ModelConfig
from llama_aot.compiler.checkpoint import model_config_from_hf
from llama_aot.compiler.errors import BuildError
from llama_aot.compiler.model import MLP, Attention, BatchInputs, RMSNorm, rope_inv_freq, rotary

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IGNORED = ("t2d",)


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """SGLang's and vLLM's taps; a model of under 6 layers (a test's) taps its first, middle and last."""
    if num_layers < 6:
        return 0, num_layers // 2, num_layers - 1
    return 2, num_layers // 2, num_layers - 3


@dataclass(frozen=True)
class EagleHeadConfig:
    """The head's layer (a one-layer ModelConfig over the target's vocabulary), its draft
    vocabulary, and the target layers whose input it reads."""
    model: ModelConfig
    draft_vocab_size: int
    aux_layers: tuple[int, int, int]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        m, p = self.model, "midlayer."
        h, i = m.hidden_size, m.intermediate_size
        shapes = {"fc.weight": (h, 3 * h), "norm.weight": (h,), "lm_head.weight": (self.draft_vocab_size, h),
                  p + "input_layernorm.weight": (h,), p + "hidden_norm.weight": (h,),
                  p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (m.q_size, 2 * h), p + "self_attn.k_proj.weight": (m.kv_size, 2 * h),
                  p + "self_attn.v_proj.weight": (m.kv_size, 2 * h), p + "self_attn.o_proj.weight": (h, m.q_size),
                  p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)}
        if self.draft_vocab_size != m.vocab_size:
            shapes["d2t"] = (self.draft_vocab_size,)
        return shapes


def read_head_config(path: Path, target: ModelConfig) -> EagleHeadConfig:
    """The head's config, checked against the target it will draft for: the same hidden size and
    vocabulary (it reads the target's residual stream and embeddings), and the same key/value
    heads and head size (its one-layer cache is laid out as the target's, which the runtime
    derives it from)."""
    where = path / "config.json"
    try:
        hf = json.loads(where.read_text())
    except FileNotFoundError:
        raise BuildError(f"{path}: no config.json; --speculative-draft-model-path must be an EAGLE-3 head's "
                         "Hugging Face directory") from None
    except (OSError, ValueError) as e:
        raise BuildError(f"{where}: not readable JSON ({e})") from None
    try:
        model = model_config_from_hf(hf, architecture=ARCHITECTURE)
    except BuildError as e:
        raise BuildError(f"{path}: {e}") from None
    if model.num_layers != 1:
        raise BuildError(f"{where}: num_hidden_layers is {model.num_layers}; an EAGLE-3 head has one layer")
    for field, what in (("hidden_size", "hidden size"), ("vocab_size", "vocabulary"),
                        ("num_kv_heads", "key/value head count"), ("head_dim", "head size")):
        if getattr(model, field) != getattr(target, field):
            raise BuildError(f"{path}: the head's {what} is {getattr(model, field)} but the target's is "
                             f"{getattr(target, field)}; use a head trained for this model")
    draft_vocab = hf.get("draft_vocab_size", model.vocab_size)
    if not isinstance(draft_vocab, int) or not 0 < draft_vocab <= model.vocab_size:
        raise BuildError(f"{where}: draft_vocab_size {draft_vocab!r} must be a positive integer no larger than "
                         f"vocab_size {model.vocab_size}")
    layers = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") \
        or default_aux_layers(target.num_layers)
    if len(layers) != 3 or not all(isinstance(i, int) and 0 <= i < target.num_layers for i in layers):
        raise BuildError(f"{where}: eagle_aux_hidden_state_layer_ids {list(layers)} must be three layers of the "
                         f"target's {target.num_layers}")
    return EagleHeadConfig(model, draft_vocab, tuple(layers))


def read_head(path: Path, target: ModelConfig) -> tuple[EagleHeadConfig, dict[str, torch.Tensor]]:
    """The head's config and tensors, every name, shape and dtype checked."""
    config = read_head_config(path, target)
    file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if file is None:
        raise BuildError(f"{path}: no {' or '.join(WEIGHT_FILES)}; the head's weights are missing")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            tensors = load_file(str(file))
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a corrupt file raises whatever its reader raises)
        raise BuildError(f"{file}: cannot be read ({type(e).__name__}: {e}); re-download the head") from None
    expected = config.shapes()
    tensors = {name: t for name, t in tensors.items() if name not in IGNORED}
    for name, shape in expected.items():
        if name not in tensors:
            raise BuildError(f"{file.name}: missing tensor {name}; not an EAGLE-3 head for this model")
        if tuple(tensors[name].shape) != shape:
            raise BuildError(f"{file.name}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)} for "
                             "this model")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise BuildError(f"{file.name}: unexpected tensor {unknown[0]}; not an EAGLE-3 head (EAGLE-1/2 heads are "
                         "not read yet)")
    ids = tensors["d2t"] + torch.arange(config.draft_vocab_size) if "d2t" in tensors else None
    if ids is not None and (tensors["d2t"].dtype != torch.int64 or not (ids.ge(0) & ids.lt(config.model.vocab_size)).all()):
        raise BuildError(f"{file.name}: d2t must be int64 offsets that map every draft id into the target's "
                         f"{config.model.vocab_size} ids")
    return config, tensors


def head_fingerprint(path: Path) -> str:
    """What the build cache keys a head on: its config and its weight file's name, size and mtime."""
    import hashlib

    h = hashlib.sha256((path / "config.json").read_bytes())
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            st = (path / name).stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def write_head(path: Path, config: EagleHeadConfig, tensors: dict[str, torch.Tensor], base: dict) -> None:
    """Writes a head in the layout read_head reads: `base` is the target's config.json, whose
    Llama fields the head's config repeats (as trained heads' configs do)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    m = config.model
    hf = {**base, "architectures": [ARCHITECTURE], "num_hidden_layers": 1, "draft_vocab_size": config.draft_vocab_size,
          "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
          "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
          "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(config.aux_layers), "use_aux_hidden_state": True}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


class Eagle3Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, 0, input_size=2 * cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, embeds, hidden, attend):
        """`attend(x)`: the attention over x's 2H-wide rows, paged (Eagle3Head.forward) or dense
        over an unrolled chain (compiler/eagle_train.py)."""
        x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)
        h = hidden + attend(x)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    """`forward(tokens, hidden, positions, slots, block_tables, context_lens, query_index,
    logits_index, kv_cache) -> (logits [len(logits_index), V] in float32, hidden [T, H])`.

    `tokens[t]` is the token after position t, `hidden[t]` the mixed taps of the target at t
    (`mix`) or, one draft step on, the head's own returned hidden state. The cache is the head's
    own, of one layer, addressed by the target's block tables. The logits are the draft
    vocabulary's placed at their target ids, -inf elsewhere, so the runtime samples and compares
    draft and target over one vocabulary."""

    def __init__(self, config: EagleHeadConfig):
        super().__init__()
        cfg = config.model
        self.config = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # the target's, shared
        self.fc = nn.Linear(3 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)

    def mix(self, taps: torch.Tensor) -> torch.Tensor:
        """[T, 3H] (the target's residual stream entering its aux_layers, concatenated) -> [T, H]."""
        return self.fc(taps)

    def forward(self, tokens, hidden, positions, slots, block_tables, context_lens, query_index, logits_index,
                kv_cache):
        batch = BatchInputs(positions, slots, block_tables, context_lens, query_index)
        embeds = self.embed_tokens(tokens)
        cos, sin = rotary(positions, self.rope_inv_freq, embeds.dtype)
        h = self.midlayer(embeds, hidden, lambda x: self.midlayer.self_attn(x, cos, sin, batch, kv_cache))
        draft = self.lm_head(self.norm(h[logits_index])).float()
        logits = draft.new_full((draft.shape[0], self.config.model.vocab_size), float("-inf"))
        return logits.index_copy(1, self.target_ids(), draft), h

    def target_ids(self) -> torch.Tensor:
        """[Vd]: the target id of each draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t


def build_head(config: EagleHeadConfig, tensors: dict[str, torch.Tensor], embed_tokens: torch.Tensor) -> Eagle3Head:
    """The head with `tensors` (read_head's) and the target's embedding table as its own, adopted
    without copies as compiler/model.py's build_model does."""
    with torch.device("meta"):
        head = Eagle3Head(config)
    head.rope_inv_freq = rope_inv_freq(config.model)
    state = {**tensors, "embed_tokens.weight": embed_tokens}
    state.setdefault("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
    head.load_state_dict(state, strict=True, assign=True)
    return head.eval().requires_grad_(False)
