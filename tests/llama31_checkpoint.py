"""Tiny random Llama 3.1 checkpoints with the real Llama 3 tokenizer (a helper, not a test file).

`write_llama31_checkpoint` writes what a Hugging Face Llama-3.1-Instruct directory holds, at toy size:
- a random transformers LlamaForCausalLM with Llama 3.1's shape in miniature (hidden 64, 4 query
  heads and 2 KV heads of 16, llama3 RoPE scaling with 3.1's parameters, untied embeddings) and its
  real vocabulary of 128256, saved in bfloat16 like the real checkpoint: about 33 MB, nearly all of
  it the two 128256 x 64 embedding matrices;
- tokenizer.json converted from Meta's tiktoken file in the `llama-models` package
  (`llama3/tokenizer.model`) with transformers' TikTokenConverter, plus the 256 special tokens that
  Meta's `Tokenizer` class defines, in its order, so ids match Meta's (<|begin_of_text|> 128000,
  <|eom_id|> 128008, <|eot_id|> 128009, <|python_tag|> 128010). Meta's list names 128005 and 128011
  <|step_id|> and <|image|> where the 3.1 release on the Hub has reserved tokens; chat never uses them;
- tokenizer_config.json with the official Llama 3.1 Instruct chat template (tool calling included),
  bos <|begin_of_text|> and eos <|eot_id|>; `clean_up_tokenization_spaces` is false, the fix for the
  3.1 release's true, which makes transformers drop spaces before punctuation when decoding;
- generation_config.json with 3.1's sampling defaults and eos ids [128001, 128008, 128009].

The converted tokenizer (bench/llama3_tokenizer.py) takes a couple of seconds, so it is built once per
process.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llama_aot.bench.llama3_tokenizer import BOS_ID, VOCAB_SIZE, llama3_tokenizer_json, meta_tokenizer_path  # noqa: F401

EOS_IDS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# The "chat_template" of meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json, verbatim (data
# the checkpoint ships; the same text appears in huggingface.js's jinja tests under that model name).
LLAMA31_CHAT_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''


def write_llama31_checkpoint(path, num_layers: int = 2, seed: int = 0,
                             dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the tiny Llama 3.1 Instruct checkpoint directory and return its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=224, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(ROPE_SCALING),
        # 0.2, not HF's 0.02: peaked logits, so greedy decoding is not a near-tie everywhere.
        initializer_range=0.2, bos_token_id=BOS_ID, eos_token_id=list(EOS_IDS), tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(dtype).eval().save_pretrained(path)
    (path / "tokenizer.json").write_text(llama3_tokenizer_json(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA31_CHAT_TEMPLATE}, indent=2) + "\n", encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS_ID, "do_sample": True, "eos_token_id": list(EOS_IDS), "temperature": 0.6,
        "top_p": 0.9}, indent=2) + "\n", encoding="utf-8")
    return path
