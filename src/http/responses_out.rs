//! What `/v1/responses` sends back: the response object, and when
//! streaming, the Responses event sequence (`response.created`, the output
//! items with their text or argument deltas, `response.completed`).

use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use serde_json::{json, Value};

use super::generation::{self, Generation, SseItem, Step};
use super::log::RequestLog;
use super::responses::ResponsesRequest;
use super::wire::Usage;
use crate::engine::{FinishReason, ToolCallEvent};

/// The request fields a response repeats, and its ids.
#[derive(Clone)]
pub struct Echo {
    id: String,
    created_at: u64,
    model: String,
    fields: Value,
}

impl Echo {
    pub fn new(req: &ResponsesRequest, model: &str, log: &RequestLog) -> Self {
        Self {
            id: format!("resp_{}", log.id().replace('-', "")),
            created_at: super::wire::unix_now(),
            model: model.to_string(),
            fields: json!({
                "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens,
                "metadata": req.metadata.clone().unwrap_or_else(|| json!({})),
                "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(true),
                "temperature": req.sampling.temperature,
                "top_p": req.sampling.top_p,
                "tool_choice": req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
                "tools": req.tools.clone().unwrap_or_default(),
                "text": req.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
                "user": req.sampling.user,
                "store": false,
                "truncation": "disabled",
            }),
        }
    }

    fn item_id(&self, kind: &str, n: usize) -> String {
        format!("{kind}_{}_{n}", self.id.trim_start_matches("resp_"))
    }

    /// The response object: `in_progress` until `finish` is known.
    pub fn response(
        &self,
        output: Vec<Value>,
        finish: Option<FinishReason>,
        usage: Option<Usage>,
    ) -> Value {
        let (status, incomplete) = match finish {
            None => ("in_progress", Value::Null),
            Some(FinishReason::Length) => ("incomplete", json!({"reason": "max_output_tokens"})),
            Some(_) => ("completed", Value::Null),
        };
        let mut body = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "usage": usage.map(|u| json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.map_or(0, |d| d.cached_tokens)},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            })),
        });
        if let (Value::Object(b), Value::Object(f)) = (&mut body, &self.fields) {
            b.extend(f.clone());
        }
        body
    }
}

/// The output items of one response, as they complete.
#[derive(Default)]
pub struct Output {
    items: Vec<Value>,
    /// The open message item's index and text.
    message: Option<(usize, String)>,
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content: Vec<Value> = if status == "in_progress" {
        Vec::new()
    } else {
        vec![text_part(text)]
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

fn call_item(id: &str, call: &ToolCallEvent, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call.id, "name": call.name,
           "arguments": arguments, "status": status})
}

impl Output {
    /// A finished choice's output.
    pub fn whole(echo: &Echo, text: String, calls: Vec<ToolCallEvent>) -> Self {
        let mut out = Self::default();
        if !text.is_empty() {
            out.items
                .push(message_item(&echo.item_id("msg", 0), &text, "completed"));
        }
        for call in calls {
            let id = echo.item_id("fc", out.items.len());
            out.items
                .push(call_item(&id, &call, &call.arguments, "completed"));
        }
        out
    }

    pub fn items(self) -> Vec<Value> {
        self.items
    }

    /// Streams `text`, opening the message item first if needed.
    fn text(&mut self, echo: &Echo, text: String, events: &mut Vec<Value>) {
        if text.is_empty() {
            return;
        }
        let index = match &mut self.message {
            Some((index, buf)) => {
                buf.push_str(&text);
                *index
            }
            None => {
                let index = self.items.len();
                let id = echo.item_id("msg", index);
                self.items.push(message_item(&id, "", "in_progress"));
                events.push(
                    json!({"type": "response.output_item.added", "output_index": index,
                                   "item": message_item(&id, "", "in_progress")}),
                );
                events.push(json!({"type": "response.content_part.added", "item_id": id,
                                   "output_index": index, "content_index": 0, "part": text_part("")}));
                self.message = Some((index, text.clone()));
                index
            }
        };
        let id = echo.item_id("msg", index);
        events.push(
            json!({"type": "response.output_text.delta", "item_id": id, "output_index": index,
                           "content_index": 0, "delta": text, "logprobs": []}),
        );
    }

    /// Closes the open message item, if any.
    fn close_message(&mut self, echo: &Echo, events: &mut Vec<Value>) {
        let Some((index, text)) = self.message.take() else {
            return;
        };
        let id = echo.item_id("msg", index);
        events.push(
            json!({"type": "response.output_text.done", "item_id": id, "output_index": index,
                           "content_index": 0, "text": text, "logprobs": []}),
        );
        events.push(
            json!({"type": "response.content_part.done", "item_id": id, "output_index": index,
                           "content_index": 0, "part": text_part(&text)}),
        );
        let item = message_item(&id, &text, "completed");
        events.push(json!({"type": "response.output_item.done", "output_index": index, "item": item.clone()}));
        self.items[index] = item;
    }

    /// A complete call: its item, its arguments as one delta, and its end.
    fn call(&mut self, echo: &Echo, call: &ToolCallEvent, events: &mut Vec<Value>) {
        self.close_message(echo, events);
        let index = self.items.len();
        let id = echo.item_id("fc", index);
        events.push(
            json!({"type": "response.output_item.added", "output_index": index,
                           "item": call_item(&id, call, "", "in_progress")}),
        );
        events.push(
            json!({"type": "response.function_call_arguments.delta", "item_id": id,
                           "output_index": index, "delta": call.arguments}),
        );
        events.push(
            json!({"type": "response.function_call_arguments.done", "item_id": id,
                           "output_index": index, "arguments": call.arguments}),
        );
        let item = call_item(&id, call, &call.arguments, "completed");
        events.push(json!({"type": "response.output_item.done", "output_index": index, "item": item.clone()}));
        self.items.push(item);
    }
}

/// Numbers and sends events in order.
struct Sequencer {
    next: u64,
}

impl Sequencer {
    fn items(&mut self, events: Vec<Value>) -> SseItem {
        SseItem::concat(events.into_iter().map(|mut e| {
            e["sequence_number"] = json!(self.next);
            self.next += 1;
            SseItem::chunk(&e)
        }))
    }
}

/// The event stream of a response.
pub fn stream(gen: Generation, echo: Echo) -> impl Stream<Item = SseItem> {
    let state = Arc::new(Mutex::new((
        Output::default(),
        None::<FinishReason>,
        Sequencer { next: 0 },
    )));
    let start = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let created = echo.response(Vec::new(), None, None);
        let events = vec![
            json!({"type": "response.created", "response": created}),
            json!({"type": "response.in_progress", "response": created}),
        ];
        s.2.items(events)
    };
    let (step_state, step_echo) = (state.clone(), echo.clone());
    let render = move |step| {
        let mut s = step_state.lock().unwrap_or_else(|e| e.into_inner());
        let (output, finish, seq) = &mut *s;
        let mut events = Vec::new();
        match step {
            Step::Delta { text, .. } => output.text(&step_echo, text, &mut events),
            Step::ToolCall { call, .. } => output.call(&step_echo, &call, &mut events),
            Step::Finished { reason, .. } => {
                output.close_message(&step_echo, &mut events);
                *finish = Some(reason);
            }
        }
        seq.items(events)
    };
    let done = move |usage| {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let (output, finish, seq) = &mut *s;
        let items = std::mem::take(&mut output.items);
        let body = echo.response(items, *finish, Some(usage));
        let kind = if body["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        seq.items(vec![json!({"type": kind, "response": body})])
    };
    futures::stream::iter([start]).chain(generation::sse_events(gen, true, render, done))
}
