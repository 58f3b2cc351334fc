"""OpenNMT-py's GlobalAttention (Luong dot/general, Bahdanau mlp) on the fused ops.

Semantics follow OpenNMT-py at commit 97111d9 (master, 2024-06-27; v3.x), where the
layer is batch-first: ``forward`` returns ``attn_h`` (B, T, dim) and ``align_vectors``
(B, T, S), or (B, dim) / (B, S) for a one-step query. OpenNMT-py before 3.0 returned
time-first (T, B, ...) outputs for multi-step queries; this module does not.

Differences from OpenNMT-py, all deliberate:
* a row with ``src_len == 0`` gives attention 0 and context 0 (OpenNMT-py gives NaN);
* with ``coverage``, OpenNMT-py adds ``linear_cover(coverage)`` to the caller's
  ``enc_out`` in place; here the caller's tensor is left unchanged (same outputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..functional import additive_attention, dot_attention

_ATTN_TYPES = ("dot", "general", "mlp")
_ATTN_FUNCS = ("softmax", "sparsemax")


def sparsemax(scores: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """Sparsemax (Martins & Astudillo, 2016) over the last dim, in plain PyTorch ops.

    scores: (..., S); keep: bool (..., S) broadcastable, True = attend. Masked positions
    get 0; a row with nothing to attend is all 0. Autograd through sort/cumsum/gather
    gives the sparsemax Jacobian (g - mean of g over the support, 0 off the support).
    """
    if keep is not None:
        keep = keep.expand_as(scores)
        empty = ~keep.any(-1, keepdim=True)
        # Masked entries at -inf never enter the support; empty rows get finite dummies.
        scores = scores.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    # Shift invariance: subtracting the (detached) max changes neither value nor gradient.
    z = scores - scores.detach().amax(-1, keepdim=True)
    z_sorted, _ = torch.sort(z, dim=-1, descending=True)
    cumsum = z_sorted.cumsum(-1) - 1
    rho = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    support = (rho * z_sorted > cumsum).sum(-1, keepdim=True)  # >= 1 for any finite row
    tau = cumsum.gather(-1, support - 1) / support.to(z.dtype)
    out = torch.clamp(z - tau, min=0)
    if keep is not None:
        out = out.masked_fill(empty, 0.0)
    return out


class GlobalAttention(nn.Module):
    """Drop-in for ``onmt.modules.GlobalAttention`` (same constructor, parameters, outputs).

    * dot:     score = h_s . q                      (fused ``dot_attention``)
    * general: score = h_s . (linear_in q)          (fused ``dot_attention``)
    * mlp:     score = v . tanh(linear_query q + linear_context h_s)
                                                    (fused ``additive_attention``)

    Then ``attn_h = linear_out([c, q])``, followed by tanh for dot/general.
    With coverage (B, S), OpenNMT-py replaces the encoder states by
    ``tanh(enc_out + linear_cover(coverage))`` for *both* the scores and the context.
    ``attn_func="sparsemax"`` is not fused: scores, sparsemax and the weighted sum are
    computed with plain PyTorch ops (mlp then materialises a (B, T, S, dim) tensor).

    Args:
        dim: size of the query, the encoder states and the output.
        coverage: create ``linear_cover`` (Linear(1, dim, bias=False)).
        attn_type: "dot", "general" or "mlp".
        attn_func: "softmax" or "sparsemax".
    """

    def __init__(self, dim: int, coverage: bool = False, attn_type: str = "dot",
                 attn_func: str = "softmax"):
        super().__init__()
        if attn_type not in _ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {_ATTN_TYPES}, got {attn_type!r}")
        if attn_func not in _ATTN_FUNCS:
            raise ValueError(f"attn_func must be one of {_ATTN_FUNCS}, got {attn_func!r}")
        self.dim = dim
        self.attn_type = attn_type
        self.attn_func = attn_func
        if attn_type == "general":
            self.linear_in = nn.Linear(dim, dim, bias=False)
        elif attn_type == "mlp":
            self.linear_context = nn.Linear(dim, dim, bias=False)
            self.linear_query = nn.Linear(dim, dim, bias=True)
            self.v = nn.Linear(dim, 1, bias=False)
        # OpenNMT-py: only mlp's output layer has a bias.
        self.linear_out = nn.Linear(dim * 2, dim, bias=attn_type == "mlp")
        if coverage:
            self.linear_cover = nn.Linear(1, dim, bias=False)

    def _check(self, src: Tensor, enc_out: Tensor, src_len, coverage) -> None:
        if src.dim() not in (2, 3) or src.shape[-1] != self.dim:
            raise ValueError(f"src must have shape (B, {self.dim}) or (B, T, {self.dim}), "
                             f"got {tuple(src.shape)}")
        if enc_out.dim() != 3 or enc_out.shape[0] != src.shape[0] \
                or enc_out.shape[2] != self.dim:
            raise ValueError(f"enc_out must have shape ({src.shape[0]}, S, {self.dim}), "
                             f"got {tuple(enc_out.shape)}")
        B, S = enc_out.shape[0], enc_out.shape[1]
        if src_len is not None and (src_len.dim() != 1 or src_len.shape[0] != B):
            raise ValueError(f"src_len must have shape ({B},), got {tuple(src_len.shape)}")
        if coverage is not None:
            if not hasattr(self, "linear_cover"):
                raise ValueError("coverage given but the layer was built with coverage=False")
            if tuple(coverage.shape) != (B, S):
                raise ValueError(f"coverage must have shape ({B}, {S}), "
                                 f"got {tuple(coverage.shape)}")

    def forward(self, src: Tensor, enc_out: Tensor, src_len: Optional[Tensor] = None,
                coverage: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """
        Args:
            src: queries (B, dim) for one step or (B, T, dim).
            enc_out: encoder states (B, S, dim).
            src_len: integer (B,); positions j < src_len[b] attend.
            coverage: (B, S) accumulated attention; needs ``coverage=True``.

        Returns:
            attn_h (B, dim) / (B, T, dim) and align_vectors (B, S) / (B, T, S).
        """
        self._check(src, enc_out, src_len, coverage)
        one_step = src.dim() == 2
        q = src.unsqueeze(1) if one_step else src
        if coverage is not None:
            # linear_cover maps each scalar coverage[b, j] to a dim-vector.
            enc_out = torch.tanh(enc_out + self.linear_cover(coverage.unsqueeze(-1)))
        if self.attn_func == "softmax":
            if self.attn_type == "mlp":
                c, align = additive_attention(
                    self.linear_query(q), self.linear_context(enc_out),
                    self.v.weight.view(-1), enc_out, lengths=src_len)
            else:
                qq = self.linear_in(q) if self.attn_type == "general" else q
                c, align = dot_attention(qq, enc_out, enc_out, lengths=src_len)
        else:
            c, align = self._sparsemax_attention(q, enc_out, src_len)
        attn_h = self.linear_out(torch.cat([c, q], -1))
        if self.attn_type != "mlp":
            attn_h = torch.tanh(attn_h)
        if one_step:
            return attn_h.squeeze(1), align.squeeze(1)
        return attn_h, align

    def _sparsemax_attention(self, q: Tensor, enc_out: Tensor, src_len):
        """Unfused path: (c (B, T, dim), align (B, T, S))."""
        if self.attn_type == "mlp":
            hidden = torch.tanh(self.linear_query(q).unsqueeze(2)
                                + self.linear_context(enc_out).unsqueeze(1))
            scores = self.v(hidden).squeeze(-1)
        else:
            qq = self.linear_in(q) if self.attn_type == "general" else q
            scores = torch.bmm(qq, enc_out.transpose(1, 2))
        keep = None
        if src_len is not None:
            pos = torch.arange(enc_out.shape[1], device=enc_out.device)
            keep = (pos < src_len.unsqueeze(1)).unsqueeze(1)  # (B, 1, S)
        align = sparsemax(scores, keep)
        return torch.bmm(align, enc_out), align
