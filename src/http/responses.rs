//! `POST /v1/responses`: OpenAI's Responses API, stateless. The whole
//! conversation comes in `input` (text, messages, earlier function calls
//! and their outputs); nothing is stored, so `previous_response_id` is
//! refused. Tools, `tool_choice`, `text.format` (structured output) and
//! streaming with the Responses event types work as in chat completions.

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kindling_models::{ChatMessage, FunctionCall, MessageToolCall};
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat_input;
use super::error::ApiError;
use super::generation;
use super::log::RequestLog;
use super::responses_out::{self, Output};
use super::wire::{token_limit, SamplingFields};
use super::AppState;
use crate::engine::{OutputConstraint, ToolUse};
use crate::registry::Purpose;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Value,
    pub instructions: Option<String>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub text: Option<Value>,
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub background: bool,
    pub metadata: Option<Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

fn bad(param: &str, why: impl Into<String>) -> ApiError {
    ApiError::invalid(param, why)
}

/// The text of a message's content: a string or a list of text parts.
fn content_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(bad(
                            &format!("{at}.content[{j}]"),
                            format!(
                            "content of type `{}` is not supported by this model (input_text is)",
                            kind.unwrap_or("?")
                        ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(bad(
            &format!("{at}.content"),
            "expected text or a list of parts",
        )),
    }
}

/// `instructions` and `input` as a conversation.
fn conversation(req: &ResponsesRequest) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::new();
    if let Some(system) = &req.instructions {
        out.push(ChatMessage::new("system", system.clone()));
    }
    let items = match &req.input {
        Value::String(s) => {
            out.push(ChatMessage::new("user", s.clone()));
            return Ok(out);
        }
        Value::Array(items) => items,
        _ => return Err(bad("input", "`input` must be text or a list of items")),
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        let field = |name: &str| item.get(name).and_then(Value::as_str);
        match kind {
            "message" => {
                let role = match field("role") {
                    Some("system" | "developer") => "system",
                    Some(r @ ("user" | "assistant")) => r,
                    other => {
                        return Err(bad(
                            &format!("{at}.role"),
                            format!("role `{}` is not supported (system, developer, user, assistant are)", other.unwrap_or("?")),
                        ))
                    }
                };
                let content = item.get("content").unwrap_or(&Value::Null);
                out.push(ChatMessage::new(role, content_text(content, &at)?));
            }
            "function_call" => {
                let (Some(call_id), Some(name)) = (field("call_id"), field("name")) else {
                    return Err(bad(&at, "a `function_call` item needs `call_id` and `name`"));
                };
                let arguments = serde_json::from_str(field("arguments").unwrap_or("{}"))
                    .map_err(|e| bad(&format!("{at}.arguments"), format!("the arguments are not JSON: {e}")))?;
                let call = MessageToolCall {
                    id: call_id.to_string(),
                    kind: "function",
                    function: FunctionCall { name: name.to_string(), arguments },
                };
                // Calls of one turn share one assistant message.
                match out.last_mut() {
                    Some(prev) if prev.role == "assistant" && !prev.tool_calls.is_empty() => prev.tool_calls.push(call),
                    _ => {
                        let mut msg = ChatMessage::new("assistant", "");
                        msg.tool_calls.push(call);
                        out.push(msg);
                    }
                }
            }
            "function_call_output" => {
                let Some(call_id) = field("call_id") else {
                    return Err(bad(&format!("{at}.call_id"), "a `function_call_output` item needs `call_id`"));
                };
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => content_text(other, &at)?,
                    None => String::new(),
                };
                let mut msg = ChatMessage::new("tool", output);
                msg.tool_call_id = Some(call_id.to_string());
                out.push(msg);
            }
            other => {
                return Err(bad(
                    &format!("{at}.type"),
                    format!("input items of type `{other}` are not supported (message, function_call, function_call_output are)"),
                ))
            }
        }
    }
    if out.iter().all(|m| m.role == "system") {
        return Err(bad("input", "`input` has no message to answer"));
    }
    Ok(out)
}

/// Tools (flat in this API: `{"type": "function", "name": …}`) and `tool_choice`.
fn tool_use(req: &ResponsesRequest) -> Result<Option<ToolUse>, ApiError> {
    let tools = req
        .tools
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| {
            let mut function = t.clone();
            if let Value::Object(map) = &mut function {
                map.remove("type");
                map.remove("strict");
            }
            chat_input::tool(i, &json!({"type": t.get("type"), "function": function}))
        })
        .collect::<Result<Vec<_>, _>>()?;
    chat_input::offer(
        tools,
        req.tool_choice.as_ref(),
        "/name",
        req.parallel_tool_calls,
    )
}

/// `text.format`: text, json_object or json_schema (`{name, schema, strict}`).
fn text_format(text: Option<&Value>) -> Result<Option<OutputConstraint>, ApiError> {
    let Some(format) = text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let as_chat = match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => json!({"type": "json_schema", "json_schema": {
            "schema": format.get("schema"), "strict": format.get("strict")}}),
        _ => format.clone(),
    };
    let mut c = chat_input::response_format(Some(&as_chat)).map_err(|e| e.param("text.format"))?;
    if let Some(c) = &mut c {
        c.param = "text.format";
    }
    Ok(c)
}

/// The handler.
pub async fn handle(
    State(state): State<AppState>,
    Extension(log): Extension<RequestLog>,
    Extension(key): Extension<std::sync::Arc<crate::tenancy::Principal>>,
    headers: axum::http::HeaderMap,
    super::extract::ApiJson(req): super::extract::ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    state.accepting()?;
    let user = req.sampling.user.as_deref();
    let target = super::versions::resolve(&state, &log, &key, &req.model, user, &headers)?;
    if req.previous_response_id.is_some() {
        return Err(bad(
            "previous_response_id",
            "responses are not stored: send the whole conversation in `input`",
        ));
    }
    if req.background {
        return Err(bad("background", "background responses are not supported"));
    }
    log.user(user);
    let messages = conversation(&req)?;
    let tools = tool_use(&req)?;
    let constraint = text_format(req.text.as_ref())?;
    let max_tokens = token_limit("max_output_tokens", req.max_output_tokens)?;
    let defaults = state.registry.text_defaults(&target.name, Purpose::Chat)?;
    let mut sampling = req.sampling.validate(&defaults, None)?;
    // One output per response.
    sampling.n = 1;
    let job = chat_input::ChatSpec {
        messages,
        max_tokens,
        default_max_tokens: defaults.max_tokens.map(|m| m as usize),
        sampling,
        fields: &req.sampling,
        tools,
        constraint,
    }
    .job(&state, &target, "input", &log)?;
    let echo = responses_out::Echo::new(&req, &target.name, &log);
    if req.stream {
        let render = move |gen| responses_out::stream(gen, echo);
        return generation::stream_response(&state.registry, job, log, render).await;
    }
    let gen = generation::start(&state.registry, job).await?;
    let cold_load = gen.cold_load;
    let (mut choices, usage) = gen.collect().await?;
    let c = choices.pop().unwrap_or_default();
    let output = Output::whole(&echo, c.text, c.tool_calls);
    let body = echo.response(output.items(), c.finish_reason, Some(usage));
    let mut resp = Json(body).into_response();
    generation::mark_cold(&mut resp, cold_load);
    Ok(resp)
}
