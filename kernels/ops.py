"""Custom ops the model and the passes call: `torch.ops.llama_aot.*`.

Each op is a `torch.library.triton_op`. Export keeps it as one node (so passes can see and match
it), and Inductor traces into its body when it lowers the program. On CPU the body is the plain-torch
reference, which Inductor compiles to C++; the CUDA target adds Triton launches through `wrap_triton`
behind the same op, so the graph and the artifact format do not change between targets.

Importing this module registers the ops: the model imports it before export, and the runtime before
it loads a program.
"""
from llama_aot.kernels import decode_linear, fp8_linear, kv_cache, paged_attention, rms_norm  # noqa: F401  (registers ops)
