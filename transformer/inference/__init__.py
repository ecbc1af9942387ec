"""Decoding: from a trained model to translations.

* ``search`` — ``greedy_decode`` and ``beam_search`` over whole batches, with the cache;
* ``translator`` — the ``Translator``: sentences in, sentences (or n-best lists) out;
* ``scoring`` — sacreBLEU, chrF and lowercased BLEU.
"""
