"""The Responses API (stateless) through the official `openai` client:
text in and out, streaming events the client assembles, function calls and
their outputs, structured output, and what is refused."""
import json

import daemon
import jsonschema
import openai
import pytest
from daemon import ROOT
from openai import OpenAI

MODEL = "smollm2-135m"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                         "required": ["city"]}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    proc, address, log = daemon.start(ROOT / "configs" / "kindling.toml")
    yield OpenAI(base_url=f"http://{address}/v1", api_key="not-needed", max_retries=0)
    daemon.stop(proc, log)


def test_text_in_text_out_and_streamed_the_same(client):
    args = dict(model=MODEL, input="Name a colour.", instructions="Be brief.", max_output_tokens=40, temperature=0)
    r = client.responses.create(**args)
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text and r.output[0].type == "message"
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    with client.responses.stream(**args) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert final.output_text == r.output_text
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    short = client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_function_calls_and_their_outputs(client):
    args = dict(model=MODEL, input=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                temperature=0.8, max_output_tokens=80, extra_body={"seed": 3})
    r = client.responses.create(**args)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), TOOLS[0]["parameters"])
    with client.responses.stream(**args) as stream:
        final = stream.get_final_response()
    assert [(o.name, o.arguments) for o in final.output] == [(call.name, call.arguments)]
    # The call and its output go back in `input`; the model answers.
    loop = client.responses.create(
        model=MODEL, tools=TOOLS, temperature=0, max_output_tokens=30,
        input=ASK + [{"type": "function_call", "call_id": call.call_id, "name": call.name,
                      "arguments": call.arguments},
                     {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}])
    assert loop.output and loop.usage.input_tokens > r.usage.input_tokens


def test_structured_output(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}
    r = client.responses.create(model=MODEL, input="Invent a person.", max_output_tokens=80, temperature=1.0,
                                text={"format": {"type": "json_schema", "name": "person", "strict": True,
                                                 "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)


def test_what_is_refused_names_its_field(client):
    for extra, param in [({"previous_response_id": "resp_1"}, "previous_response_id"),
                         ({"input": [{"type": "image_generation_call"}]}, "input[0].type"),
                         ({"tool_choice": "always"}, "tool_choice"),
                         ({"text": {"format": {"type": "xml"}}}, "text.format")]:
        args = dict(model=MODEL, input="Hi", max_output_tokens=5)
        args.update(extra)
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**args)
        assert e.value.body["param"] == param, (extra, e.value.body)
