//! What a chat request carries besides sampling: the conversation (with
//! tool calls and results), the tools and `tool_choice`, and the structured
//! output it asks for (`response_format`, and vLLM's `guided_*` extensions).

use kindling_models::tools::Tool;
use kindling_models::{ChatMessage, FunctionCall, Grammar, MessageToolCall};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::generation::Job;
use super::log::RequestLog;
use super::wire::{SamplingFields, StreamOptions, ValidSampling};
use super::AppState;
use crate::engine::{GenerateSpec, OutputConstraint, Prompt, ToolChoice, ToolUse};
use crate::registry::Resolved;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub guided: GuidedFields,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A chat request for the engine: one conversation, its `n` choices.
pub struct ChatSpec<'a> {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<usize>,
    /// The manifest's default `max_tokens`.
    pub default_max_tokens: Option<usize>,
    pub sampling: ValidSampling,
    /// The request's sampling and lifetime fields, as sent.
    pub fields: &'a SamplingFields,
    pub tools: Option<ToolUse>,
    pub constraint: Option<OutputConstraint>,
}

impl ChatSpec<'_> {
    /// Checks it as a whole (see [`GenerateSpec::validate`]) and makes the
    /// job for `target`, starting the route's shadow copy if it has one;
    /// `param` is blamed for prompt errors.
    pub fn job(
        self,
        state: &AppState,
        target: &Resolved,
        param: &'static str,
        log: &RequestLog,
    ) -> Result<Job, ApiError> {
        let request = GenerateSpec {
            prompts: vec![Prompt::Chat(self.messages)],
            max_tokens: self.max_tokens,
            default_max_tokens: self.default_max_tokens,
            stop: self.sampling.stop,
            n: self.sampling.n,
            sampling: self.sampling.params,
            echo: false,
            ignore_eos: self.fields.ignore_eos,
            min_tokens: self.sampling.min_tokens,
            tools: self.tools,
            constraint: self.constraint,
            cache_salt: self.fields.cache_salt.clone(),
            prompt_lookup: self.sampling.prompt_lookup,
        }
        .validate()?;
        let job = Job::new(
            &target.name,
            request,
            self.fields,
            param,
            log,
            state.request_timeout,
        )?;
        super::versions::shadow_generation(&state.registry, target, &job.request, job.keep_alive);
        Ok(job)
    }
}

/// vLLM's structured-output extensions, for chat and text completions.
#[derive(Debug, Default, Deserialize)]
pub struct GuidedFields {
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

impl GuidedFields {
    /// The grammar these fields ask for (at most one may be set).
    pub fn constraint(&self) -> Result<Option<OutputConstraint>, ApiError> {
        let mut set = Vec::new();
        if let Some(v) = &self.guided_json {
            let schema = match v {
                // vLLM accepts the schema as JSON text too.
                Value::String(s) => serde_json::from_str(s).map_err(|e| {
                    ApiError::invalid("guided_json", format!("`guided_json` is not JSON: {e}"))
                })?,
                other => other.clone(),
            };
            set.push(("guided_json", Grammar::JsonSchema(schema)));
        }
        if let Some(rx) = &self.guided_regex {
            set.push(("guided_regex", Grammar::Regex(rx.clone())));
        }
        if let Some(choices) = &self.guided_choice {
            set.push(("guided_choice", Grammar::Choice(choices.clone())));
        }
        if let Some(g) = &self.guided_grammar {
            set.push(("guided_grammar", Grammar::Lark(g.clone())));
        }
        match set.len() {
            0 => Ok(None),
            1 => {
                let (param, grammar) = set.remove(0);
                Ok(Some(OutputConstraint { grammar, param }))
            }
            _ => Err(ApiError::invalid(
                set[1].0,
                "set at most one of guided_json, guided_regex, guided_choice, guided_grammar",
            )),
        }
    }
}

/// One input message.
#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    pub tool_calls: Option<Vec<ToolCallIn>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// A call in an assistant message of the history.
#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    pub function: FunctionIn,
}

/// The function a call named, with its arguments as JSON text.
#[derive(Debug, Deserialize)]
pub struct FunctionIn {
    pub name: String,
    #[serde(default)]
    pub arguments: Option<String>,
}

/// Message content: a string, or a list of parts of which we read the text ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

fn text_of(content: &Option<Content>, i: usize) -> Result<String, ApiError> {
    Ok(match content {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].content[{j}]"),
                            format!("content part of type `{kind}` is not supported by this model (text is)"),
                        ))
                    }
                }
            }
            text
        }
    })
}

/// The conversation as the chat template sees it.
pub fn messages(input: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    input
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        format!("role `{other}` is not supported (system, developer, user, assistant, tool are)"),
                    ))
                }
            };
            let mut msg = ChatMessage::new(role, text_of(&m.content, i)?);
            if role == "tool" {
                if m.tool_call_id.is_none() {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].tool_call_id"),
                        "a `tool` message needs the `tool_call_id` it answers",
                    ));
                }
                msg.tool_call_id = m.tool_call_id.clone();
                msg.name = m.name.clone();
            }
            for (j, call) in m.tool_calls.iter().flatten().enumerate() {
                if role != "assistant" {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].tool_calls"),
                        "only assistant messages carry `tool_calls`",
                    ));
                }
                let raw = call.function.arguments.as_deref().unwrap_or("{}");
                // Templates write arguments out as JSON; transformers and
                // vLLM hand them an object, so parse what the client sent.
                let arguments = serde_json::from_str(raw).map_err(|e| {
                    ApiError::invalid(
                        &format!("messages[{i}].tool_calls[{j}].function.arguments"),
                        format!("the arguments are not JSON: {e}"),
                    )
                })?;
                msg.tool_calls.push(MessageToolCall {
                    id: call.id.clone().unwrap_or_else(|| format!("call_{i}_{j}")),
                    kind: "function",
                    function: FunctionCall {
                        name: call.function.name.clone(),
                        arguments,
                    },
                });
            }
            Ok(msg)
        })
        .collect()
}

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when
/// no tools are offered. With `tool_choice: none` the tools are still shown
/// to the model (as vLLM does), but no calls are read from its text.
pub fn tool_use(req: &ChatCompletionRequest) -> Result<Option<ToolUse>, ApiError> {
    let tools = match &req.tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            if list.len() > MAX_TOOLS {
                return Err(ApiError::invalid(
                    "tools",
                    format!("at most {MAX_TOOLS} tools, got {}", list.len()),
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, t)| tool(i, t))
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be a list")),
    };
    offer(
        tools,
        req.tool_choice.as_ref(),
        "/function/name",
        req.parallel_tool_calls,
    )
}

/// The tools offered and `tool_choice` (whose named form keeps the name at
/// `name_at`, a JSON pointer) as the engine takes them; `None` when no tools
/// are offered and none is asked for.
pub(super) fn offer(
    tools: Vec<Tool>,
    tool_choice: Option<&Value>,
    name_at: &str,
    parallel: Option<bool>,
) -> Result<Option<ToolUse>, ApiError> {
    let choice = match tool_choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` `{other}` is not one of none, auto, required"),
                ))
            }
        },
        Some(v) => match v.pointer(name_at).and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                ToolChoice::Named(name.to_string())
            }
            _ => {
                let shape = if name_at == "/name" {
                    "{\"type\": \"function\", \"name\": …}"
                } else {
                    "{\"type\": \"function\", \"function\": {\"name\": …}}"
                };
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` must be none, auto, required or {shape}"),
                ));
            }
        },
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Auto | ToolChoice::None) {
        return Ok(None);
    }
    Ok(Some(ToolUse {
        tools,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

pub(super) fn tool(i: usize, t: &Value) -> Result<Tool, ApiError> {
    let bad = |field: &str, why: &str| ApiError::invalid(&format!("tools[{i}]{field}"), why);
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(".type", "only tools of type `function` are supported"));
    }
    let f = t
        .get("function")
        .ok_or_else(|| bad(".function", "a tool needs a `function`"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| {
            (1..=64).contains(&n.len())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .ok_or_else(|| {
            bad(
                ".function.name",
                "a function name is 1-64 letters, digits, `_` or `-`",
            )
        })?;
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(_) => {
            return Err(bad(
                ".function.parameters",
                "`parameters` must be a JSON Schema object",
            ))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        description: f
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string),
        parameters,
    })
}

/// Reads `response_format`: `text` (no constraint), `json_object` (any
/// JSON object) or `json_schema` (valid against the schema; constrained
/// whether or not `strict` is set; strict also closes every declared
/// object to undeclared properties, as OpenAI's strict mode does).
pub fn response_format(v: Option<&Value>) -> Result<Option<OutputConstraint>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |why: &str| ApiError::invalid("response_format", why);
    let grammar = match v.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => Grammar::JsonSchema(serde_json::json!({"type": "object"})),
        Some("json_schema") => {
            let schema = v
                .pointer("/json_schema/schema")
                .ok_or_else(|| bad("`json_schema` needs `json_schema.schema`"))?;
            if !schema.is_object() {
                return Err(bad("`json_schema.schema` must be a JSON Schema object"));
            }
            let mut schema = schema.clone();
            if v.pointer("/json_schema/strict").and_then(Value::as_bool) == Some(true) {
                // Strict mode: no properties beyond those declared.
                kindling_models::tools::close_objects(&mut schema);
            }
            Grammar::JsonSchema(schema)
        }
        _ => return Err(bad("`type` must be text, json_object or json_schema")),
    };
    Ok(Some(OutputConstraint {
        grammar,
        param: "response_format",
    }))
}
