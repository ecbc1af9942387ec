"""Training: from batches to a trained model in a run directory.

* ``loss`` — ``LabelSmoothing``; ``schedule`` — Adam and the Noam ``rate``;
* ``trainer`` — the ``Trainer`` and its epoch loop; ``state`` — its counters, when it
  stops, the random state a checkpoint keeps; ``callbacks`` — the progress bar, the
  epoch log, validation and the checkpoint files;
* ``checkpoint`` — saving, loading and averaging checkpoints;
* ``run`` — a whole run from a config: new, resumed or fine-tuned;
* ``distributed`` — several processes under ``torchrun``.
"""
