#!/usr/bin/env python
"""Tokenize audio files, folders or a dataset into semantic-token strings (the ``gemma-rvq tokenize`` parser).

    python examples/tokenize_dataset.py recordings/ -m twi-rvq --format ichigo -o tokens.jsonl
    python examples/tokenize_dataset.py --dataset user/twi-speech --split train -m twi-rvq -o twi-tokens

For a multi-GPU or multi-process run over a large dataset, call ``Dataset.map(SpeechTokenizer(...),
num_proc=..., with_rank=True)`` yourself (docs/tokenize-speech.md).
"""

from __future__ import annotations

import sys

from gemma_rvq.commands.tokenize import main, make_parser

if __name__ == "__main__":
    sys.exit(main(make_parser(prog="tokenize_dataset.py").parse_args()))
