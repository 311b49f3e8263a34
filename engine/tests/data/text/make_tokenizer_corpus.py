"""Expected token ids for the extended tokenizer corpus, from Hugging Face `tokenizers`.

Writes tokenizer_corpus.json: for every text and every vocabulary (the tiny test model's, the
real DeepSeek-V3 and DeepSeek-R1 ones) the ids of `encode(text, add_special_tokens=False)` and
`decode(ids, skip_special_tokens=True)`. Usage (needs `pip install tokenizers`), from this folder:

    python make_tokenizer_corpus.py
"""

import gzip
import json

from tokenizers import Tokenizer

VOCABS = {
    "tiny": "tiny_tokenizer.json",
    "v3": "deepseek-v3_tokenizer.json.gz",
    "r1": "deepseek-r1_tokenizer.json.gz",
}

TEXTS = [
    # English
    "Hello, world! How are you today?",
    "The DeepSeek-V3 model has 671B parameters, 37B of them active per token.",
    "I'm sure they'll say it's fine; isn't it?",
    "ALL CAPS AND lower case AnD MiXeD",
    # Chinese, Japanese, Korean
    "深度求索是一家人工智能公司。",
    "请用中文回答：什么是混合专家模型？",
    "東京は日本の首都です。カタカナとひらがな。",
    "ｶﾀｶﾅ（半角）と全角ＡＢＣ１２３",
    "안녕하세요, 세계!",
    # code
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "def add(a, b):\n\treturn a + b\n\n\nclass Foo(object):\n    pass\n",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    # emoji
    "👍👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "smile 😀😃😄😁 done",
    # whitespace runs
    "a" + " " * 17 + "b",
    "tabs\t\t\t\there",
    "\n\n\n\n\n\n",
    " \t \n \r\n\t\t  \n",
    "    indented\n        more\n    back",
    "trailing\n\n",
    "   ",
    # digits
    "1234567",
    "0 00 000 0000 00000",
    "3.14159265358979",
    "1,000,000 and 1_000_000 and 1e-9",
    "٣٤٥ ١٢٣٤ (Arabic-Indic digits)",
    "²³ ½ Ⅻ",
    # mixed scripts
    "Hello世界こんにちはПривет123abc",
    "iPhone15のバッテリーは3000mAh",
    "naïve café résumé façade",
    "Ελληνικά και English mixed",
    "עברית ו-العربية",
    # special tokens inside text
    "<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>",
    "<｜User｜>Explain MoE.<｜Assistant｜>Sure.<｜end▁of▁sentence｜>",
    "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
    "text<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "<|EOT|> and <｜fim▁begin｜>x<｜fim▁hole｜>y<｜fim▁end｜>",
    "<｜place▁holder▁no▁5｜> <｜▁pad▁｜>",
    "no special: <|User|> <User> <｜User>",
    # odd bytes / edge cases
    "",
    "a",
    "\u00a0non\u00a0breaking\u2009thin",
    "zero\u200bwidth\u200djoin",
    "\ufeffBOM at start",
    "combining: e\u0301 a\u0308 n\u0303",
    "math: ∀x∈ℝ, x²≥0 ⇒ √(x²)=|x|",
    "quotes: “smart” ‘single’ «guillemets» „low“",
    "...---...!!!???",
]


def load(path: str) -> Tokenizer:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return Tokenizer.from_str(f.read().decode("utf-8"))
    return Tokenizer.from_file(path)


def main() -> None:
    toks = {name: load(path) for name, path in VOCABS.items()}
    cases = []
    for text in TEXTS:
        case = {"text": text, "ids": {}, "decoded_skip_special": {}}
        for name, tok in toks.items():
            ids = tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids, skip_special_tokens=False) == text, (name, text)
            case["ids"][name] = ids
            case["decoded_skip_special"][name] = tok.decode(ids, skip_special_tokens=True)
        cases.append(case)
    out = {"vocabs": VOCABS, "cases": cases}
    with open("tokenizer_corpus.json", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
