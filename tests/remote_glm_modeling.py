"""A tiny GLM-style causal LM in the shape of checkpoints that ship their own modelling code (ChatGLM-6B/2/3:
`transformer.encoder.layers.N.self_attention.query_key_value`, `.dense`, `mlp.dense_h_to_4h`,
`mlp.dense_4h_to_h`, head `transformer.output_layer`). Tests copy this file into a model folder whose
config.json maps to it (`auto_map`), so it is loaded only through `trust_remote_code`.

Written for transformers 5: generate() hands the KV cache over as `cache` and reads it back from the
output's `cache` field."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyGLMConfig(PretrainedConfig):
    model_type = "tinyglm"

    def __init__(self, vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                 max_position_embeddings=512, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_hidden_layers = num_layers  # what transformers' DynamicCache reads
        self.num_attention_heads = num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class SelfAttention(nn.Module):
    def __init__(self, config: TinyGLMConfig, layer_idx: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.layer_idx = layer_idx
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden, mask, cache):
        batch, length, width = hidden.shape
        q, k, v = self.query_key_value(hidden).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, config: TinyGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden):
        return self.dense_4h_to_h(nn.functional.gelu(self.dense_h_to_4h(hidden)))


class GLMBlock(nn.Module):
    def __init__(self, config: TinyGLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, hidden, mask, cache):
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Encoder(nn.Module):
    def __init__(self, config: TinyGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size)


class Embedding(nn.Module):
    def __init__(self, config: TinyGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class GLMTransformer(nn.Module):
    def __init__(self, config: TinyGLMConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class TinyGLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]

    def __init__(self, config: TinyGLMConfig):
        super().__init__(config)
        self.transformer = GLMTransformer(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                labels=None, inputs_embeds=None, **kwargs):
        embed = self.transformer.embedding
        hidden = embed.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        total = past + length
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.long, device=hidden.device)
        if position_ids is None:  # left padding: positions count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        hidden = hidden + embed.position_embeddings(position_ids)
        rows = torch.arange(past, total, device=hidden.device)[:, None]
        causal = torch.arange(total, device=hidden.device)[None, :] <= rows
        mask = causal[None] & attention_mask.bool()[:, None, :]
        mask = mask | (torch.arange(total, device=hidden.device)[None, :] == rows)[None]  # pads see themselves
        if use_cache is False:
            cache = None
        for layer in self.transformer.encoder.layers:
            hidden = layer(hidden, mask[:, None], cache)
        logits = self.transformer.output_layer(self.transformer.encoder.final_layernorm(hidden)).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
