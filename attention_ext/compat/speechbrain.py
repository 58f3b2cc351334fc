"""SpeechBrain's ``LocationAwareAttention`` on the fused op.

Semantics follow ``speechbrain/nnet/attention.py`` of SpeechBrain 1.1.2: the same
constructor, forward signature, state_dict keys, initial weights (the same modules built
in the same order, so one seed gives the same layer), ``scaling``, ``mlp_out`` on the
context, and the state kept from call to call until ``reset()``: the memory's projection
and mask of the first call after a reset, and ``prev_attn``, the previous weights,
detached (no gradient flows through them), 1 / enc_len over each row's positions at the
first step. The attributes ``enc_len``, ``precomputed_enc_h``, ``mask`` and ``prev_attn``
are SpeechBrain's, so its beam search reorders ``prev_attn`` as it does SpeechBrain's.

Differences, all deliberate:
* the initial ``prev_attn`` has the memory's dtype (SpeechBrain's is float32 whatever the
  model's dtype, which its float64 or bfloat16 convolution then rejects);
* a row of length 0 gets weights 0 and context ``mlp_out(0)`` (SpeechBrain's gives NaN).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import location_attention


class LocationAwareAttention(nn.Module):
    """Drop-in for SpeechBrain's ``speechbrain.nnet.attention.LocationAwareAttention``
    (Chorowski et al. 2015), fused.

    e[j] = scaling * mlp_attn(tanh(mlp_enc(enc[j]) + mlp_dec(dec)
                                   + mlp_loc(conv_loc(prev_attn))[j])),
    attn = softmax(e) over the positions of enc_len, output = mlp_out(sum_j attn[j] enc[j]).
    mlp_loc's bias is added to the query's projection, where it has the same effect.

    Args:
        enc_dim: the encoder states' size.
        dec_dim: the decoder state's size.
        attn_dim: the attention's hidden size.
        output_dim: the output's size (mlp_out of the context).
        conv_channels: the location convolution's filters.
        kernel_size: its half width: 2 * kernel_size + 1 taps.
        scaling: multiplies the energies before the softmax.
    """

    precomputed_enc_h: Optional[Tensor]

    def __init__(self, enc_dim: int, dec_dim: int, attn_dim: int, output_dim: int,
                 conv_channels: int, kernel_size: int, scaling: float = 1.0):
        super().__init__()
        self.mlp_enc = nn.Linear(enc_dim, attn_dim)
        self.mlp_dec = nn.Linear(dec_dim, attn_dim)
        # SpeechBrain builds mlp_attn here and again after mlp_loc, keeping the second;
        # both draws are made so that one seed gives SpeechBrain's initial parameters.
        self.mlp_attn = nn.Linear(attn_dim, 1, bias=False)
        self.conv_loc = nn.Conv1d(1, conv_channels, kernel_size=2 * kernel_size + 1,
                                  padding=kernel_size, bias=False)
        self.mlp_loc = nn.Linear(conv_channels, attn_dim)
        self.mlp_attn = nn.Linear(attn_dim, 1, bias=False)
        self.mlp_out = nn.Linear(enc_dim, output_dim)
        self.scaling = scaling
        self.reset()

    def reset(self) -> None:
        """Forgets the memory's projection, the mask and the previous weights: the next
        call starts a new utterance batch."""
        self.enc_len = None
        self.precomputed_enc_h = None
        self.mask = None
        self.prev_attn = None

    def forward(self, enc_states: Tensor, enc_len: Tensor,
                dec_states: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            enc_states: (B, S, enc_dim), the memory.
            enc_len: (B,), the lengths (positions j < enc_len[b] attend).
            dec_states: (B, dec_dim), the decoder state.

        Returns:
            output (B, output_dim) = mlp_out(context), attn (B, S).
        """
        if self.precomputed_enc_h is None:
            self.precomputed_enc_h = self.mlp_enc(enc_states)
            positions = torch.arange(enc_states.size(1), device=enc_len.device,
                                     dtype=enc_len.dtype)
            # 1 and 0 in enc_len's dtype on enc_states' device, as SpeechBrain's mask.
            self.mask = (positions < enc_len[:, None]).to(enc_len.dtype).to(enc_states.device)
            exact = torch.float64 if enc_states.dtype == torch.float64 else torch.float32
            self.prev_attn = (self.mask * (1 / enc_len.to(exact))[:, None]).to(enc_states.dtype)
        query = F.linear(dec_states, self.mlp_dec.weight, self.mlp_dec.bias + self.mlp_loc.bias)
        context, attn = location_attention(
            query, self.precomputed_enc_h, self.prev_attn[:, None], self.conv_loc.weight,
            self.mlp_loc.weight, self.mlp_attn.weight[0], enc_states, mask=self.mask != 0,
            scale=self.scaling)
        self.prev_attn = attn.detach()
        return self.mlp_out(context), attn
