"""Extract the tokenizer metadata of a GGUF file into a small JSON file.

The tests build the tokenizer through `Tokenizer::from_gguf_vocab` from this file, so they do
not need the GGUF itself. Usage (needs `pip install gguf`):

    python make_gguf_vocab.py MODEL.gguf tiny_gguf_vocab.json
"""

import json
import sys

from gguf import GGUFReader


def main(src: str, dst: str) -> None:
    fields = GGUFReader(src).fields

    def get(key, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    out = {
        "source": src.rsplit("/", 1)[-1],
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_types": [int(t) for t in get("tokenizer.ggml.token_type")],
        "merges": get("tokenizer.ggml.merges"),
        "bos_id": get("tokenizer.ggml.bos_token_id"),
        "eos_id": get("tokenizer.ggml.eos_token_id"),
        "padding_id": get("tokenizer.ggml.padding_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "chat_template": get("tokenizer.chat_template"),
    }
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
