"""The published layers that attention_ext.compat replaces, in eager PyTorch as their
projects write them (same parameter names and shapes): the tests' oracles and the
benchmarks' baselines (benchmarks/bench_compat.py puts this folder on its path); not part
of the installed package, and never used by the fused layers.

* OpenNMT-py's GlobalAttention, from its formulas and its code at commit 97111d9
  (2024-06-27, batch-first outputs): coverage replaces the encoder states by
  tanh(enc_out + linear_cover(coverage)) for scores and context; padding is masked to
  -inf before softmax/sparsemax; attn_h = linear_out([c, q]) (+ tanh for dot/general).
* The BahdanauAttention of PyTorch's seq2seq translation tutorial, plus a `keep` mask
  (True = attend) for masked comparisons.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention_ext.compat.opennmt import sparsemax


class EagerGlobalAttention(nn.Module):
    """Eager OpenNMT-py GlobalAttention (same parameter names and shapes)."""

    def __init__(self, dim, coverage=False, attn_type="dot", attn_func="softmax"):
        super().__init__()
        self.dim, self.attn_type, self.attn_func = dim, attn_type, attn_func
        if attn_type == "general":
            self.linear_in = nn.Linear(dim, dim, bias=False)
        elif attn_type == "mlp":
            self.linear_context = nn.Linear(dim, dim, bias=False)
            self.linear_query = nn.Linear(dim, dim, bias=True)
            self.v = nn.Linear(dim, 1, bias=False)
        self.linear_out = nn.Linear(dim * 2, dim, bias=attn_type == "mlp")
        if coverage:
            self.linear_cover = nn.Linear(1, dim, bias=False)

    def score(self, h_t, h_s):
        if self.attn_type in ("dot", "general"):
            if self.attn_type == "general":
                h_t = self.linear_in(h_t)
            return torch.bmm(h_t, h_s.transpose(1, 2))
        B, T, S, d = h_t.shape[0], h_t.shape[1], h_s.shape[1], self.dim
        wq = self.linear_query(h_t).view(B, T, 1, d).expand(B, T, S, d)
        uh = self.linear_context(h_s).view(B, 1, S, d).expand(B, T, S, d)
        return self.v(torch.tanh(wq + uh)).view(B, T, S)

    def forward(self, src, enc_out, src_len=None, coverage=None):
        one_step = src.dim() == 2
        if one_step:
            src = src.unsqueeze(1)
        B, S, d = enc_out.shape
        T = src.shape[1]
        if coverage is not None:
            cover = self.linear_cover(coverage.reshape(-1, 1)).view_as(enc_out)
            enc_out = torch.tanh(enc_out + cover)
        align = self.score(src, enc_out)
        if src_len is not None:
            pad = torch.arange(S) >= src_len.unsqueeze(1)
            align = align.masked_fill(pad.unsqueeze(1), float("-inf"))
        flat = align.view(B * T, S)
        a = F.softmax(flat, -1) if self.attn_func == "softmax" else sparsemax(flat)
        a = a.view(B, T, S)
        c = torch.bmm(a, enc_out)
        h = self.linear_out(torch.cat([c, src], 2).view(B * T, 2 * d)).view(B, T, d)
        if self.attn_type in ("dot", "general"):
            h = torch.tanh(h)
        if one_step:
            return h.squeeze(1), a.squeeze(1)
        return h, a


class EagerTutorialBahdanau(nn.Module):
    """The tutorial's eager layer (intermediate/seq2seq_translation_tutorial), plus the
    same mask/lengths convention as ours (True = attend) for the masked tests."""

    def __init__(self, hidden_size):
        super().__init__()
        self.Wa = nn.Linear(hidden_size, hidden_size)
        self.Ua = nn.Linear(hidden_size, hidden_size)
        self.Va = nn.Linear(hidden_size, 1)

    def forward(self, query, keys, keep=None):
        scores = self.Va(torch.tanh(self.Wa(query) + self.Ua(keys)))
        scores = scores.squeeze(2).unsqueeze(1)
        if keep is not None:
            scores = scores.masked_fill(~keep.unsqueeze(1), float("-inf"))
        weights = F.softmax(scores, dim=-1)
        context = torch.bmm(weights, keys)
        return context, weights
