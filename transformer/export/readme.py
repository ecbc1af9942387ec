"""``README.md`` of an exported folder: how to use it with CTranslate2 alone.

Written from the folder's ``transformer.json`` (``converter.metadata``), so that someone
with the folder and ``ctranslate2`` (and SentencePiece or spaCy), but not this package,
tokenizes and decodes as the project does.
"""

from __future__ import annotations

from typing import Any

SENTENCEPIECE_FILE = "sentencepiece.model"


def readme(meta: dict[str, Any]) -> str:
    """``README.md`` of an exported folder: how to use it with CTranslate2 alone."""
    tok, cfg = meta["tokenizer"], meta["config"]
    m, d = cfg["model"], cfg["decode"]
    if tok["kind"] == "sentencepiece":
        how = (
            "Tokenize with the SentencePiece model beside this file, pieces as strings:\n\n"
            "```python\n"
            "import ctranslate2, sentencepiece as spm\n"
            f"sp = spm.SentencePieceProcessor(model_file=\"{SENTENCEPIECE_FILE}\")\n"
            "translator = ctranslate2.Translator(\".\", inter_threads=2, intra_threads=1)\n"
            "source = [sp.encode(\"Ein Hund läuft.\", out_type=str)]  # no </s>: the model adds it\n"
            "result = translator.translate_batch(source, beam_size=1, max_decoding_length=40, min_decoding_length=0,\n"
            "                                    suppress_sequences=[[\"<pad>\"]])\n"
            "print(sp.decode(result[0].hypotheses[0]))\n"
            "```\n"
        )
    elif tok["kind"] == "spacy":
        how = (
            f"Tokenize the source with spaCy's rule-based tokenizer for `{tok['src_lang']}` "
            f"(`spacy.blank(\"{tok['src_lang']}\").tokenizer`, whitespace tokens dropped); words not in "
            "`source_vocabulary.json` are `<unk>`. Output tokens are words of "
            f"`{tok['tgt_lang']}`, to be joined with spaces (this package's `detokenize` also glues "
            "punctuation and clitics).\n"
        )
    else:
        how = ("The copy task: the source is its symbols as digits separated by spaces; the decoder starts "
               "with `1` and, without an end symbol, runs to `max_decoding_length`.\n")
    return (
        "# A CTranslate2 model exported by annotated-transformer\n\n"
        f"Exported from `{meta['exported_from']}` (step {meta['step']}), weights in {meta['quantization']}, "
        f"with ctranslate2 {meta['ctranslate2_version']}: {m['N']}+{m['N']} layers, d_model {m['d_model']}, "
        f"{m['h']} heads, {m['norm']}-norm, {meta['max_positions']} positions.\n\n"
        "## Tokens\n\n"
        f"{how}\n"
        "Sources end with `</s>`, which the model appends itself (`add_source_eos` in `config.json`).\n\n"
        "## Decoding as the project decodes\n\n"
        "`python translate.py --model THIS_FOLDER` does all of the following. With `translate_batch` directly:\n\n"
        "- `min_decoding_length=0` (the default 1 forbids an empty translation) and "
        "`suppress_sequences=[[\"<pad>\"]]` (padding is never a word);\n"
        f"- at most `{d['max_len_a']:g} * source_tokens + {d['max_len_b']}` tokens, `</s>` included "
        "(`max_decoding_length` is one number per call: group sentences by it, or cut greedy outputs "
        "to their own limit);\n"
        f"- beam {d['beam_size']} with GNMT's length penalty α = {d['length_penalty']:g}: ask for "
        "`length_penalty=0, num_hypotheses=beam_size, return_scores=True, return_end_token=True` and "
        "re-rank by `score / ((5 + length) / 6) ** α`, length counting `</s>` (CTranslate2's own penalty is "
        "`length ** α`, without `</s>`);\n"
        "- on a 2-core CPU, `inter_threads=2, intra_threads=1` with several batches in flight.\n\n"
        "`transformer.json` holds the checkpoint's whole config and these settings.\n"
    )
