"""The teaching figures: the article's pictures and the attention maps, from this package's code.

* ``article`` — the causal mask, √d_k scaling, positional encodings, the Noam schedule,
  label smoothing, and a run's training curve;
* ``attention`` — the attention weights of one sentence pair, drawn layer by layer;
* ``command`` — ``python -m transformer.figures``, which draws them all;
* ``drawing`` — matplotlib, imported only when a picture is drawn.
"""
