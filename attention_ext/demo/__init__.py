"""The demo: ``python -m attention_ext.demo`` trains a character-level Seq2Seq model with
fused attention to rewrite dates written in many locales as ISO 8601 (see ``--help``).

Its data (``dates``), model and training loop (``training``) and heatmaps (``heatmaps``)
need the optional extra ``attention_ext[demo]`` (babel, tqdm, matplotlib); this package and
its command line parser do not.
"""

# --attention: the decoder and its score.
ATTENTIONS = ("bahdanau", "luong-dot", "luong-general", "luong-concat")


class UserError(Exception):
    """A mistake in the command line or in what it names: printed without a traceback."""
