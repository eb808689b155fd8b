use super::*;
use crate::chat_template::{ChatMessage, FunctionCall, MessageToolCall};

fn feed(format: ToolFormat, pieces: &[&str]) -> Vec<Piece> {
    let mut p = ToolParser::new(format);
    let mut out: Vec<Piece> = pieces.iter().flat_map(|t| p.push(t)).collect();
    out.extend(p.finish());
    // Merge adjacent text the way a client concatenates deltas.
    let mut merged: Vec<Piece> = Vec::new();
    for piece in out {
        match (merged.last_mut(), piece) {
            (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
            (_, piece) => merged.push(piece),
        }
    }
    merged
}

fn call(name: &str, arguments: &str) -> Piece {
    Piece::Call(ToolCall {
        name: name.into(),
        arguments: arguments.into(),
    })
}

#[test]
fn hermes_calls_are_read_across_any_split_and_text_passes_through() {
    let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    let want = vec![
        Piece::Text("Let me look.\n".into()),
        call("get_weather", r#"{"city":"Paris"}"#),
        call("get_time", "{}"),
    ];
    for split in 1..text.len() {
        if !text.is_char_boundary(split) {
            continue;
        }
        let (a, b) = text.split_at(split);
        assert_eq!(feed(ToolFormat::Hermes, &[a, b]), want, "split at {split}");
    }
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(feed(ToolFormat::Generic, &refs), want);
}

#[test]
fn text_that_only_looks_like_a_marker_is_content() {
    assert_eq!(
        feed(ToolFormat::Hermes, &["a <tool", "_cal", "ling> b <"]),
        vec![Piece::Text("a <tool_calling> b <".into())]
    );
    // A malformed call is shown as the text it is, not dropped.
    let bad = "<tool_call>\n{not json}\n</tool_call>";
    assert_eq!(
        feed(ToolFormat::Hermes, &[bad]),
        vec![Piece::Text(bad.into())]
    );
    // A call left open by the next one, or by the end, still counts.
    assert_eq!(
        feed(ToolFormat::Hermes, &["<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n<tool_"]),
        vec![call("f", "{}"), call("g", "{}")]
    );
    assert_eq!(
        feed(
            ToolFormat::Hermes,
            &["<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}"]
        ),
        vec![call("f", r#"{"x":1}"#)]
    );
}

#[test]
fn json_formats_read_the_whole_output() {
    assert_eq!(
        feed(
            ToolFormat::Llama3,
            &[
                "{\"name\": \"f\", ",
                "\"parameters\": {\"a\": \"b\"}}; {\"name\": \"g\", \"parameters\": {}}"
            ]
        ),
        vec![call("f", r#"{"a":"b"}"#), call("g", "{}")]
    );
    assert_eq!(
        feed(
            ToolFormat::Llama3,
            &["<|python_tag|>{\"name\": \"f\", \"parameters\": {}}"]
        ),
        vec![call("f", "{}")]
    );
    assert_eq!(
        feed(ToolFormat::Mistral, &["[{\"name\": \"f\", \"arguments\": {\"n\": 2}}, {\"name\": \"g\", \"arguments\": \"{}\"}]"]),
        vec![call("f", r#"{"n":2}"#), call("g", "{}")]
    );
    // Plain answers stream as content; JSON that is not a call stays text.
    assert_eq!(
        feed(ToolFormat::Llama3, &["Hello", " there"]),
        vec![Piece::Text("Hello there".into())]
    );
    assert_eq!(
        feed(ToolFormat::Llama3, &["{\"a\": 1}"]),
        vec![Piece::Text("{\"a\": 1}".into())]
    );
}

#[test]
fn the_format_is_read_from_the_template() {
    assert_eq!(ToolFormat::detect("{{ messages }}"), ToolFormat::Generic);
    assert_eq!(
        ToolFormat::detect("{% if tools %}<tools>{% endif %}<tool_call>"),
        ToolFormat::Hermes
    );
    assert_eq!(
        ToolFormat::detect("{% if tools %}[TOOL_CALLS]{% endif %}"),
        ToolFormat::Mistral
    );
    assert_eq!(
        ToolFormat::detect("{% if tools %}ipython{% endif %}"),
        ToolFormat::Llama3
    );
    assert_eq!(ToolFormat::parse("llama3"), Some(ToolFormat::Llama3));
    assert_eq!(ToolFormat::parse("nope"), None);
}

#[test]
fn call_ids_look_like_the_families_expect() {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let id = ToolFormat::Hermes.call_id(&mut rng);
    assert!(id.starts_with("call_") && id.len() == 29, "{id}");
    let id = ToolFormat::Mistral.call_id(&mut rng);
    assert!(
        id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "{id}"
    );
}

fn tool(name: &str) -> Tool {
    Tool {
        name: name.into(),
        description: Some("does things".into()),
        parameters: Some(
            serde_json::json!({"type": "object", "properties": {"q": {"type": "string"}}}),
        ),
    }
}

#[test]
fn generic_rendering_describes_tools_and_rewrites_history() {
    let mut assistant = ChatMessage::new("assistant", "");
    assistant.tool_calls.push(MessageToolCall {
        id: "call_1".into(),
        kind: "function",
        function: FunctionCall {
            name: "search".into(),
            arguments: serde_json::json!({"q": "x"}),
        },
    });
    let mut result = ChatMessage::new("tool", "42");
    result.tool_call_id = Some("call_1".into());
    let history = vec![
        ChatMessage::new("user", "hi"),
        assistant,
        result.clone(),
        result,
    ];
    let (msgs, tools) = prepare_messages(&history, &[tool("search")], ToolFormat::Generic);
    assert!(tools.is_none());
    assert_eq!(msgs[0].role, "system");
    assert!(
        msgs[0].content.contains("\"name\":\"search\""),
        "{}",
        msgs[0].content
    );
    assert_eq!(
        msgs[2].content,
        "<tool_call>\n{\"name\":\"search\",\"arguments\":{\"q\":\"x\"}}\n</tool_call>"
    );
    assert_eq!(msgs.len(), 4, "two results share one user message");
    assert_eq!(
        msgs[3].content,
        "<tool_response>\n42\n</tool_response>\n<tool_response>\n42\n</tool_response>"
    );
    let (same, tools) = prepare_messages(&history, &[tool("search")], ToolFormat::Hermes);
    assert_eq!(same, history);
    assert_eq!(tools.unwrap()[0]["function"]["name"], "search");
}

#[test]
fn forced_grammars_name_the_functions() {
    let Grammar::Lark(g) =
        ToolFormat::Hermes.forced_grammar(&[tool("a"), tool("b")], true, |_| None)
    else {
        panic!("lark expected");
    };
    assert!(
        g.contains("<tool_call>") && g.contains("\"const\":\"a\"") && g.contains("(\"\\n\" call)*"),
        "{g}"
    );
    let Grammar::Lark(g) = ToolFormat::Mistral.forced_grammar(&[tool("a")], false, |_| Some(5))
    else {
        panic!("lark expected");
    };
    assert!(
        g.starts_with("start: <[5]> %json") && g.contains("\"maxItems\":1"),
        "{g}"
    );
}

#[test]
fn declared_objects_are_closed_to_invented_keys() {
    let mut schema = serde_json::json!({
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                       "c": {"type": "object", "properties": {}, "additionalProperties": true}},
        "default": {"properties": {}},
    });
    close_objects(&mut schema);
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["properties"]["a"]["additionalProperties"], false);
    assert_eq!(schema["properties"]["c"]["additionalProperties"], true);
    assert!(schema["default"].get("additionalProperties").is_none());
}
