//! Tool calling: how each model family writes a call, how tools reach its
//! chat template, the grammar that forces a valid call, and the parser that
//! reads calls back out of the generated text.
//!
//! Families: Hermes/Qwen (`<tool_call>{json}</tool_call>`), Llama 3.x (a
//! bare `{"name": …, "parameters": …}` object, after `<|python_tag|>` for
//! some), Mistral (`[TOOL_CALLS][{…}, …]`), and a generic fallback for
//! templates with no tool support: the tools are described in a system
//! message and calls are written in the Hermes syntax.

use serde::Serialize;
use serde_json::{json, Value};

use crate::grammar::Grammar;

mod parse;
mod render;

pub use parse::{Piece, ToolParser};
pub use render::prepare_messages;

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` (Hermes, Qwen 2/2.5/3).
    Hermes,
    /// `{"name": …, "parameters": …}` (Llama 3.1–3.3 JSON tool calls).
    Llama3,
    /// `[TOOL_CALLS][{"name": …, "arguments": …}]` (Mistral v3+).
    Mistral,
    /// Hermes syntax, with the tools described by Kindling in a system
    /// message (templates that know nothing of tools).
    Generic,
}

impl ToolFormat {
    /// Every format's name, as a manifest writes it.
    pub const NAMES: &'static str = "hermes, llama3, mistral, generic";

    /// The format a manifest names.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "hermes" | "qwen" => Self::Hermes,
            "llama3" | "llama3_json" => Self::Llama3,
            "mistral" => Self::Mistral,
            "generic" => Self::Generic,
            _ => return None,
        })
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3 => "llama3",
            Self::Mistral => "mistral",
            Self::Generic => "generic",
        }
    }

    /// The format a chat template was written for, read from its source;
    /// [`ToolFormat::Generic`] when it renders no tools.
    pub fn detect(template: &str) -> Self {
        if !template.contains("tools") {
            Self::Generic
        } else if template.contains("<tool_call>") {
            Self::Hermes
        } else if template.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if template.contains("<|python_tag|>") || template.contains("ipython") {
            Self::Llama3
        } else {
            Self::Generic
        }
    }

    /// Whether the model's own template renders the tools.
    pub fn template_renders_tools(self) -> bool {
        self != Self::Generic
    }

    /// The key a call's arguments sit under.
    fn arguments_key(self) -> &'static str {
        match self {
            Self::Llama3 => "parameters",
            _ => "arguments",
        }
    }

    /// A new call id: 9 letters and digits for Mistral (its templates
    /// insist), `call_` and 24 for the others, as OpenAI writes them.
    pub fn call_id(self, rng: &mut impl rand::Rng) -> String {
        const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let mut draw = |n: usize| -> String {
            (0..n)
                .map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char)
                .collect()
        };
        match self {
            Self::Mistral => draw(9),
            _ => format!("call_{}", draw(24)),
        }
    }

    /// A grammar whose every output is one call (or, with `parallel`, one
    /// or more) of `tools`, in this format, each call's arguments valid
    /// against its function's parameter schema. `control_id` finds a
    /// control token's id (Mistral's `[TOOL_CALLS]`).
    pub fn forced_grammar(
        self,
        tools: &[Tool],
        parallel: bool,
        control_id: impl Fn(&str) -> Option<u32>,
    ) -> Grammar {
        let call = json!({"anyOf": tools.iter().map(|t| self.call_schema(t)).collect::<Vec<_>>()});
        let body = Grammar::lark_json(&call);
        let lark = match self {
            Self::Hermes | Self::Generic => {
                let more = if parallel { " (\"\\n\" call)*" } else { "" };
                format!(
                    "start: call{more}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: {body}\n"
                )
            }
            Self::Llama3 => {
                let more = if parallel { " (\"; \" body)*" } else { "" };
                format!("start: body{more}\nbody: {body}\n")
            }
            Self::Mistral => {
                let mut list = json!({"type": "array", "items": call, "minItems": 1});
                if !parallel {
                    list["maxItems"] = json!(1);
                }
                let marker = match control_id("[TOOL_CALLS]") {
                    Some(id) => format!("<[{id}]>"),
                    None => Grammar::lark_string("[TOOL_CALLS]"),
                };
                format!("start: {marker} {}\n", Grammar::lark_json(&list))
            }
        };
        Grammar::Lark(lark)
    }

    /// The JSON Schema of one call of `tool` in this format.
    fn call_schema(self, tool: &Tool) -> Value {
        let mut params = tool
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        close_objects(&mut params);
        let key = self.arguments_key();
        json!({
            "type": "object",
            "properties": {"name": {"const": tool.name}, key: params},
            "required": ["name", key],
            "additionalProperties": false,
        })
    }
}

/// Makes every object in `schema` that lists its `properties` and says
/// nothing of others closed to others (`additionalProperties: false`), as
/// OpenAI's strict mode does: a call carries the arguments its function
/// declares and no invented ones.
pub fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, v) in map.iter_mut() {
                // Constants and examples are values, not schemas.
                if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                    close_objects(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// One function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON Schema of its arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

impl Tool {
    /// The OpenAI shape templates expect: `{"type": "function", "function": {…}}`.
    pub fn as_template_value(&self) -> Value {
        json!({"type": "function", "function": self})
    }
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments: a JSON object, as text.
    pub arguments: String,
}

/// Reads one call from a JSON value written in `format`; `None` when it
/// is not a call.
fn call_from_value(value: &Value, format: ToolFormat) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?.to_string();
    let args = value
        .get(format.arguments_key())
        .or_else(|| value.get("arguments"))
        .or_else(|| value.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let arguments = match args {
        // Some models write the arguments already encoded.
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests;
