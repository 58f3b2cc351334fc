"""ESPnet's location-aware attention ``AttLoc`` on the fused op.

Semantics follow ``espnet/nets/pytorch_backend/rnn/attentions.py`` of ESPnet 202511: the
same constructor, forward signature, state_dict keys, initial weights (the same modules
built in the same order, so one seed gives the same layer), ``scaling``, the uniform
initial weights, the monotonic window of ``last_attended_idx``, and the state kept from
call to call until ``reset()``: the memory, its projection and its mask are those of the
first call after a reset (with ``han_mode``, the memory and its projection are those of
each call).

Differences, all deliberate:
* a row with nothing to attend to (length 0, or an empty window) gets weights 0 and
  context 0 (ESPnet's gives NaN);
* ``last_attended_idx`` may also be an integer tensor of shape (B,) (one index per row,
  taken on its device with no host read), and applies to a batch of any size (ESPnet
  raises NotImplementedError for B > 1); the window is clipped to [0, S].
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..functional import location_attention

Lengths = Union[Tensor, Sequence[int]]


def constraint_window(last_attended_idx: Union[int, Tensor], backward_window: int,
                      forward_window: int, batch: int, src_len: int, device) -> Tensor:
    """The monotonic attention constraint of Deep Voice 3 as the op's window (B, 2): row b
    attends [last - backward_window, last + forward_window) within [0, src_len)."""
    last = torch.as_tensor(last_attended_idx, device=device)
    if last.is_floating_point() or last.is_complex() or last.dim() > 1 \
            or last.numel() not in (1, batch):
        raise ValueError(f"last_attended_idx must be an int or an integer tensor of shape () "
                         f"or (B,) = ({batch},), got {last_attended_idx!r}")
    last = last.to(torch.int64).reshape(-1, 1).expand(batch, 1)
    start = (last - backward_window).clamp(0, src_len)
    end = torch.maximum((last + forward_window).clamp(0, src_len), start)
    return torch.cat((start, end), 1)


class AttLoc(nn.Module):
    """Drop-in for ESPnet's ``AttLoc`` (Chorowski et al. 2015), fused.

    e[j] = scaling * (gvec . tanh(mlp_enc(h[j]) + mlp_dec(dec_z)
                                  + mlp_att(loc_conv(att_prev))[j]) + gvec.bias),
    w = softmax(e) over j < enc_hs_len (and the window of last_attended_idx),
    c = sum_j w[j] h[j].

    Args:
        eprojs: the encoder states' size.
        dunits: the decoder state's size.
        att_dim: the attention's hidden size.
        aconv_chans: the location convolution's filters.
        aconv_filts: its half width: 2 * aconv_filts + 1 taps.
        han_mode: the memory and its projection are those of each call (hierarchical
            attention), not of the first call after reset().
    """

    def __init__(self, eprojs: int, dunits: int, att_dim: int, aconv_chans: int,
                 aconv_filts: int, han_mode: bool = False):
        super().__init__()
        self.mlp_enc = nn.Linear(eprojs, att_dim)
        self.mlp_dec = nn.Linear(dunits, att_dim, bias=False)
        self.mlp_att = nn.Linear(aconv_chans, att_dim, bias=False)
        # A (1, 2 aconv_filts + 1) Conv2d as ESPnet's, for its state_dict key, weight shape
        # and initial values; the fused op reads its weight as (F, 1, K).
        self.loc_conv = nn.Conv2d(1, aconv_chans, (1, 2 * aconv_filts + 1),
                                  padding=(0, aconv_filts), bias=False)
        self.gvec = nn.Linear(att_dim, 1)
        self.dunits, self.eprojs, self.att_dim = dunits, eprojs, att_dim
        self.han_mode = han_mode
        self.reset()

    def reset(self) -> None:
        """Forgets the memory, its projection and its mask: the next call takes its own."""
        self.h_length = None
        self.enc_h = None
        self.pre_compute_enc_h = None
        self.mask = None

    def forward(self, enc_hs_pad: Tensor, enc_hs_len: Lengths, dec_z: Optional[Tensor],
                att_prev: Optional[Tensor], scaling: float = 2.0,
                last_attended_idx: Optional[Union[int, Tensor]] = None,
                backward_window: int = 1, forward_window: int = 3) -> Tuple[Tensor, Tensor]:
        """
        Args:
            enc_hs_pad: (B, T, eprojs), the padded encoder states.
            enc_hs_len: (B,) lengths, a list of ints or an integer tensor.
            dec_z: (B, dunits), the decoder state, or None for zeros.
            att_prev: (B, T), the previous weights, or None for 1 / length over each row's
                positions.
            scaling: multiplies the energies before the softmax.
            last_attended_idx: the position last attended (an int, or an integer (B,)
                tensor), or None for no window.
            backward_window, forward_window: the window [last - backward_window,
                last + forward_window).

        Returns:
            c (B, eprojs), w (B, T).
        """
        batch = len(enc_hs_pad)
        if self.pre_compute_enc_h is None or self.han_mode:
            self.enc_h = enc_hs_pad
            self.h_length = enc_hs_pad.size(1)
            self.pre_compute_enc_h = self.mlp_enc(enc_hs_pad)
        if dec_z is None:
            dec_z = enc_hs_pad.new_zeros(batch, self.dunits)
        else:
            dec_z = dec_z.view(batch, self.dunits)
        if att_prev is None or self.mask is None:
            positions = torch.arange(self.h_length, device=enc_hs_pad.device)
            lengths = torch.as_tensor(enc_hs_len, device=enc_hs_pad.device)
            if att_prev is None:
                valid = (positions < lengths[:, None]).to(dec_z.dtype)
                att_prev = valid / lengths.to(dec_z.dtype)[:, None]
            if self.mask is None:
                self.mask = positions >= lengths[:, None]  # True at padding, as ESPnet's
        window = None
        if last_attended_idx is not None:
            window = constraint_window(last_attended_idx, backward_window, forward_window,
                                       batch, self.h_length, dec_z.device)
        return location_attention(
            self.mlp_dec(dec_z), self.pre_compute_enc_h, att_prev.view(batch, 1, self.h_length),
            self.loc_conv.weight[:, :, 0], self.mlp_att.weight, self.gvec.weight[0],
            self.enc_h, mask=~self.mask, window=window, score_bias=scaling * self.gvec.bias,
            scale=scaling)
