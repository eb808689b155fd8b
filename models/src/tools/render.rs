//! Putting tools and tool-call history into a conversation.

use serde_json::Value;

use super::{Tool, ToolFormat};
use crate::chat_template::ChatMessage;

/// Shapes `messages` and `tools` for a template of `format`.
///
/// A template that renders tools gets them as its `tools` variable and the
/// history as it is. For [`ToolFormat::Generic`], Kindling writes the tools
/// into the system message, each earlier call into its assistant message in
/// the Hermes syntax, and each tool result into a user message between
/// `<tool_response>` tags, so any template can render the conversation.
pub fn prepare_messages(
    messages: &[ChatMessage],
    tools: &[Tool],
    format: ToolFormat,
) -> (Vec<ChatMessage>, Option<Vec<Value>>) {
    if format.template_renders_tools() {
        let tools =
            (!tools.is_empty()).then(|| tools.iter().map(Tool::as_template_value).collect());
        return (messages.to_vec(), tools);
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let section = tools_section(tools);
        match messages.first() {
            Some(first) if first.role == "system" => {
                let mut system = first.clone();
                system.content = format!("{}\n\n{section}", system.content);
                out.push(system);
            }
            _ => out.push(ChatMessage::new("system", section)),
        }
    }
    let skip =
        usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for call in &m.tool_calls {
                    let body = serde_json::json!({
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                    });
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("<tool_call>\n{body}\n</tool_call>"));
                }
                out.push(ChatMessage::new("assistant", text));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    // Results of one turn's calls share one user message.
                    Some(prev)
                        if prev.role == "user" && prev.content.ends_with("</tool_response>") =>
                    {
                        prev.content.push('\n');
                        prev.content.push_str(&block);
                    }
                    _ => out.push(ChatMessage::new("user", block)),
                }
            }
            _ => out.push(ChatMessage::new(m.role.clone(), m.content.clone())),
        }
    }
    (out, None)
}

/// The system-message section that describes `tools` and the call syntax.
fn tools_section(tools: &[Tool]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou can call functions to help answer. These are their signatures, one JSON object per line:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.as_template_value().to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\n\nTo call a function, write a JSON object with its name and arguments between <tool_call> tags:\n<tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"argument\": \"value\"}}\n</tool_call>\nEach call goes in its own tags. Results come back between <tool_response> tags.",
    );
    s
}
