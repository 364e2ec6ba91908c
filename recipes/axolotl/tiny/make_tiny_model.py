"""Build the tiny random Llama (and its tokenizer) the CPU chain trains: `python make_tiny_model.py [DIR]`.

The tokenizer is trained on this recipe's data, so nothing is downloaded. Default DIR: ./tiny-llama next to this file.
"""

import json
import sys
from pathlib import Path

from trl_lifealign.tiny import save_tiny_model

here = Path(__file__).resolve().parent
target = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "tiny-llama"
texts = [text for path in sorted((here / "data").glob("*.json")) for row in json.loads(path.read_text())
         for text in row.values()]
print(save_tiny_model(target, texts))
