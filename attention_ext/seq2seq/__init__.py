"""Sequence-to-sequence models on the fused attention layers: an RNN encoder, Luong and
Bahdanau decoders, greedy decoding and beam search whose beams share the encoder memory
(``memory_index``), and save/load.

    from attention_ext.seq2seq import Encoder, BahdanauDecoder, Seq2Seq
    model = Seq2Seq(Encoder(V, 64, 256), BahdanauDecoder(V, 64, 256))
    logits = model(src, src_lengths, tgt_in)                  # teacher forcing
    tokens = model.greedy_decode(src, src_lengths, max_len=50)
    result = model.beam_search(src, src_lengths, beam_size=5, max_len=50,
                               length_penalty=LengthPenalty("gnmt", 0.6))
"""
from .decoders import BahdanauDecoder, DecoderState, LuongDecoder
from .encoder import Encoder
from .model import Seq2Seq
from .search import BeamSearchResult, LengthPenalty

__all__ = ["Encoder", "LuongDecoder", "BahdanauDecoder", "DecoderState", "Seq2Seq",
           "LengthPenalty", "BeamSearchResult"]
