"""Sequence-to-sequence models on the fused attention layers: an RNN encoder, Luong and
Bahdanau decoders, greedy decoding and beam search whose beams share the encoder memory
(``memory_index``), save/load, and the token helpers around them.

    from attention_ext.seq2seq import (BahdanauDecoder, Encoder, Seq2Seq, Vocabulary,
                                       pad_batch)
    src_vocab = Vocabulary(chars, bos=None, eos=None, unk="<unk>")
    tgt_vocab = Vocabulary(target_chars)                       # pad 0, bos 1, eos 2
    model = Seq2Seq(Encoder(len(src_vocab), 64, 256), BahdanauDecoder(len(tgt_vocab), 64, 256))
    src, src_lengths = pad_batch([src_vocab.encode(s) for s in sources], src_vocab.pad_idx)
    tgt, tgt_lengths = pad_batch([tgt_vocab.encode(t) for t in targets], tgt_vocab.pad_idx)
    model.loss(src, src_lengths, tgt, tgt_lengths).backward()   # teacher forcing
    tokens = model.greedy_decode(src, src_lengths, max_len=50)
    result = model.beam_search(src, src_lengths, beam_size=5, max_len=50,
                               length_penalty=LengthPenalty("gnmt", 0.6))
    texts = [tgt_vocab.decode(ids) for ids in model.token_lists(tokens)]
"""
from .decoders import BahdanauDecoder, DecoderState, LuongDecoder
from .encoder import Encoder
from .model import Seq2Seq
from .search import BeamSearchResult, LengthPenalty
from .tokens import Vocabulary, pad_batch

__all__ = ["Encoder", "LuongDecoder", "BahdanauDecoder", "DecoderState", "Seq2Seq",
           "LengthPenalty", "BeamSearchResult", "Vocabulary", "pad_batch"]
