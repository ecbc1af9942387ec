"""Text to ids to batches: everything between the files on disk and the model.

* ``files`` — reading text line by line with clear errors; writing files atomically;
* ``multi30k`` — finding, downloading and checking Multi30k;
* ``tokenizers`` — the copy task's ids, SentencePiece and spaCy, behind one registry;
* ``vocab`` — word vocabularies and the four special ids;
* ``batching`` — ``Batch``, the masks, and token-budget batches of similar lengths.
"""
