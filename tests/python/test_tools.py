"""Tool calling and structured outputs through the official `openai` client:
calls forced by `tool_choice` always match their function's schema, the
client reassembles streamed calls, a tool loop runs to an answer, and
`response_format` outputs validate against their schema."""
import json

import daemon
import gguf_vocab
import jsonschema
import openai
import pytest
from daemon import ROOT
from openai import OpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState

MODEL = "smollm2-135m"
GGUF = daemon.store() / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a zone",
                                      "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    proc, address, log = daemon.start(ROOT / "configs" / "kindling.toml")
    yield OpenAI(base_url=f"http://{address}/v1", api_key="not-needed", max_retries=0)
    daemon.stop(proc, log)


def check_calls(message):
    """Every call names an offered tool, its arguments validate against the
    tool's schema, and ids are distinct."""
    calls = message.tool_calls
    assert calls, message
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)
    return calls


def test_required_calls_are_valid_at_any_seed_and_temperature(client):
    for temperature in (0, 0.8, 1.5):
        for seed in range(3):
            r = client.chat.completions.create(
                model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                parallel_tool_calls=False, temperature=temperature, seed=seed, max_tokens=120)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", (temperature, seed, choice)
            assert len(check_calls(choice.message)) == 1
            assert choice.message.content is None


def test_a_named_function_is_the_one_called(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=4, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = check_calls(r.choices[0].message)
    assert [c.function.name for c in calls] == ["get_time"]


def test_parallel_calls(client):
    # min_tokens keeps the turn open past the first call, so the grammar's
    # only way on is a second call.
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                max_tokens=200, extra_body={"min_tokens": 30})
    r = client.chat.completions.create(**args)
    assert len(check_calls(r.choices[0].message)) >= 2
    single = client.chat.completions.create(parallel_tool_calls=False, **args)
    assert len(check_calls(single.choices[0].message)) == 1


def test_streamed_calls_are_reassembled_by_the_client(client):
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                max_tokens=200)

    def calls(message):
        return [(c.function.name, c.function.arguments) for c in check_calls(message)]

    # One call, through the client's streaming helper.
    whole = client.chat.completions.create(parallel_tool_calls=False, **args).choices[0]
    with client.chat.completions.stream(parallel_tool_calls=False, **args) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert calls(final.message) == calls(whole.message)
    # Several calls (this greedy model repeats them until max_tokens): the
    # client's stream state puts each call's pieces back together by index.
    args["extra_body"] = {"min_tokens": 30}
    whole = client.chat.completions.create(**args).choices[0]
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(stream=True, **args):
        state.handle_chunk(chunk)
    streamed = state.current_completion_snapshot.choices[0]
    assert calls(streamed.message) == calls(whole.message)
    assert len(calls(streamed.message)) >= 2
    assert streamed.finish_reason == whole.finish_reason


def test_auto_reads_calls_from_the_text_and_a_tool_loop_answers(client):
    vocab = {t: i for i, t in enumerate(gguf_vocab.tokens(GGUF))}
    history = [
        {"role": "user", "content": "What's the weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Rome\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21"},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "What's the weather in Paris?"},
    ]
    # This small model prefers to imagine a <tool_response>; steer it to
    # open a call instead. With `auto` nothing constrains what follows.
    bias = {str(vocab["response"]): -100, str(vocab["<"]): 3}
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0,
                                       max_tokens=60, logit_bias=bias)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert isinstance(json.loads(call.function.arguments), dict)
    # The loop: the call and its result go back; the model answers in text.
    history += [choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens


def test_tool_errors_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "tags", "role"],
    "additionalProperties": False,
}


def test_strict_json_schema_outputs_always_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    for temperature in (0, 0.7, 1.2, 2.0):
        for seed in range(4):
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                response_format=fmt, temperature=temperature, seed=seed, max_tokens=150)
            choice = r.choices[0]
            assert choice.finish_reason == "stop", (temperature, seed, choice)
            jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_outputs_parse(client):
    parsed = 0
    for temperature in (0.7, 1.0, 1.5):
        for seed in range(4):
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Describe a cat as JSON."}],
                response_format={"type": "json_object"}, temperature=temperature, seed=seed,
                max_tokens=300)
            choice = r.choices[0]
            if choice.finish_reason == "length":
                # Out of budget: the object is cut short, as with OpenAI.
                continue
            assert choice.finish_reason == "stop"
            assert isinstance(json.loads(choice.message.content), dict)
            parsed += 1
    # At least half finish within the budget (sampled at up to 1.5, a
    # 135M model may ramble on); none that finishes is invalid.
    assert parsed >= 6


def test_guided_extensions(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes or no?"}],
                                       max_tokens=10, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=1.0, seed=2,
                                  extra_body={"guided_regex": r"\d{3}-\d{4}"})
    text = r.choices[0].text
    assert len(text) == 8 and text[3] == "-" and (text[:3] + text[4:]).isdigit(), text
    r = client.completions.create(model=MODEL, prompt="A person:", max_tokens=150, temperature=0.9, seed=1,
                                  extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
