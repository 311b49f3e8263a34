"""Drives a running cluster's API with the official `openai` Python package.

Usage: openai_check.py BASE_URL API_KEY [--r1]

Greedy requests, streamed and not, must agree; with --r1 the model's template opens a
thinking part, so chat answers carry `reasoning_content`. Bad requests must raise the
package's typed errors with OpenAI's fields. Prints one JSON line of what it saw; exits 1 on
the first failed check.
"""

import json
import sys

import openai
from openai import OpenAI


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    base, key = sys.argv[1], sys.argv[2]
    r1 = "--r1" in sys.argv[3:]
    client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
    seen = {}

    models = [m.id for m in client.models.list()]
    check(len(models) == 1, f"one model listed: {models}")
    model = models[0]

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    whole = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        seed=1,
        # The server's extension: only max_tokens ends the answer.
        extra_body={"ignore_eos": True},
    )
    msg = whole.choices[0].message
    check(whole.object == "chat.completion", "chat object")
    check(whole.model == model, f"the response names the listed model: {whole.model}")
    check(whole.choices[0].finish_reason == "length", "finish reason")
    check(whole.usage.completion_tokens == 12, "usage counts the answer (ignore_eos: all 12)")
    check(
        whole.usage.total_tokens
        == whole.usage.prompt_tokens + whole.usage.completion_tokens,
        "usage total",
    )
    reasoning = getattr(msg, "reasoning_content", None)
    if r1:
        check(isinstance(reasoning, str), "R1 answers carry reasoning_content")
        check(len(reasoning) + len(msg.content or "") > 0, "R1 answer not empty")
    else:
        check(reasoning is None, "no reasoning_content without a thinking part")
        check(len(msg.content) > 0, "answer not empty")

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    s_content, s_reasoning, finish, usage, ids = "", "", None, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            s_content += c.delta.content or ""
            s_reasoning += getattr(c.delta, "reasoning_content", None) or ""
            finish = c.finish_reason or finish
    check(len(ids) == 1, f"one id for all chunks: {ids}")
    check(s_content == (msg.content or ""), "streamed content equals the whole answer")
    check(s_reasoning == (reasoning or ""), "streamed reasoning equals the whole answer's")
    check(finish == whole.choices[0].finish_reason, "streamed finish reason")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens, "streamed usage")
    seen["chat"] = {"content": msg.content, "reasoning_content": reasoning, "finish": finish}

    comp = client.completions.create(
        model=model, prompt="The sky is", max_tokens=8, temperature=0
    )
    text = comp.choices[0].text
    check(comp.object == "text_completion", "completion object")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="The sky is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    check(streamed == text, "streamed completion equals the whole one")
    seen["completion"] = text

    try:
        client.chat.completions.create(model=model, messages=messages, temperature="hot")
        check(False, "a bad temperature is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "400")
        check(e.param == "temperature", f"param names temperature: {e.param}")
        check(e.type == "invalid_request_error", "error type")
    try:
        OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        check(False, "a wrong key is refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "401")

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
