"""The CPU speed work: measured, tested, and kept out of the article's classes.

Each module here does what a few lines of the article do, faster, and a test holds it
to the plain version (the figures behind each choice are in docs/performance.md):

* ``attend`` — which kernel computes attention; beam search's shared key rows;
* ``dropout`` — a cheaper dropout mask on the CPU;
* ``output_loss`` — the output layer, log-softmax and label-smoothed loss fused for
  training, with a hand-written backward;
* ``decoding`` — the encoder run in pieces of sorted rows, the logits of every beam
  written into one buffer;
* ``packed`` — linear layers with their weights laid out once for oneDNN, for decoding;
* ``memory`` — glibc's malloc told to keep freed memory;
* ``flops`` — model FLOPs counted by hand, to measure against the matmul peak.

Nothing here changes what the model computes beyond rounding.
"""
