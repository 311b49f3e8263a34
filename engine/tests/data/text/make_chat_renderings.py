"""Expected chat renderings of the DeepSeek-V3 and R1 templates, from `jinja2`.

Renders each conversation the way transformers' `apply_chat_template` does (a sandboxed jinja2
environment with trim_blocks and lstrip_blocks, `raise_exception` defined, bos/eos token strings
from tokenizer_config.json) and writes chat_renderings.json. Usage (needs `pip install jinja2`),
from this folder:

    python make_chat_renderings.py
"""

import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATES = {
    "v3": "deepseek-v3_tokenizer_config.json",
    "r1": "deepseek-r1_tokenizer_config.json",
    "tiny": "tiny_tokenizer_config.json",
}


def call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


CONVERSATIONS = [
    ("single_user", [{"role": "user", "content": "What is 2+2?"}]),
    (
        "system_think_multiturn",
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nthinking\n</think>\n\nHello!"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    ),
    (
        "two_systems_multiturn",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Rouge."},
        ],
    ),
    (
        "several_think_blocks",
        [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "<think>a</think>b</think>final answer"},
            {"role": "user", "content": "q2"},
        ],
    ),
    (
        "unicode_and_specials_in_content",
        [
            {"role": "user", "content": "翻译：“你好，世界” 🚀\n\n  indented\tand <｜User｜> inside"},
        ],
    ),
    ("empty", []),
    (
        "one_tool_call",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("get_weather", '{"city": "Paris"}')],
            },
            {"role": "tool", "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "It is 21 °C in Paris."},
            {"role": "user", "content": "Thanks"},
        ],
    ),
    (
        "two_tool_calls_ending_on_output",
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("get_weather", '{"city": "Paris"}'),
                    call("get_weather", '{"city": "Rome"}'),
                ],
            },
            {"role": "tool", "content": "21"},
            {"role": "tool", "content": "25"},
        ],
    ),
]


def render(template: str, cfg: dict, messages: list, add_generation_prompt: bool) -> str:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=token_str(cfg.get("bos_token")),
        eos_token=token_str(cfg.get("eos_token")),
    )


def token_str(t):
    return t["content"] if isinstance(t, dict) else (t or "")


def main() -> None:
    cases = []
    for name, path in TEMPLATES.items():
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        for conv_name, messages in CONVERSATIONS:
            for agp in (False, True):
                try:
                    rendered = render(cfg["chat_template"], cfg, messages, agp)
                except Exception as e:  # a template that cannot render this conversation
                    rendered = None
                    print(f"{name}/{conv_name}/{agp}: {type(e).__name__}: {e}")
                cases.append(
                    {
                        "template": name,
                        "name": conv_name,
                        "add_generation_prompt": agp,
                        "messages": messages,
                        "rendered": rendered,
                    }
                )
    with open("chat_renderings.json", "w", encoding="utf-8") as f:
        json.dump({"templates": TEMPLATES, "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
