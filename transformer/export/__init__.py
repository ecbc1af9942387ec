"""Export a trained checkpoint to another inference engine: CTranslate2.

``python -m transformer.export CKPT OUT_DIR [--quantization int8]`` (or
``transformer-export``) writes a CTranslate2 model directory with the tokenizer beside
it (``converter``: the spec, the weights, the tokens; ``readme``: the folder's README;
``__main__``: the command).
``translate.py --model OUT_DIR`` then translates with it, through
``transformer.inference.ctranslate2.CTranslate2Translator``. docs/exporting.md says
what maps exactly and what does not.

Nothing here imports torch or ctranslate2 until an export runs.
"""
