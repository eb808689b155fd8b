//! Reading tool calls out of generated text as it streams.

use serde_json::Value;

use super::{call_from_value, ToolCall, ToolFormat};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_TAG: &str = "[TOOL_CALLS]";

/// What the parser makes of the text so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Ordinary content.
    Text(String),
    /// A complete tool call.
    Call(ToolCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet (JSON formats decide here).
    Start,
    /// Content: passed on, except what may begin a call marker.
    Text,
    /// Inside `<tool_call>…` (Hermes syntax).
    InCall,
    /// The whole output is JSON calls, read at the end (Llama 3, Mistral).
    Json,
}

/// Splits a choice's text into content and tool calls, holding back only
/// what might still turn out to be part of a call.
#[derive(Debug)]
pub struct ToolParser {
    format: ToolFormat,
    state: State,
    buf: String,
    calls: usize,
}

impl ToolParser {
    /// A parser for `format`.
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            state: State::Start,
            buf: String::new(),
            calls: 0,
        }
    }

    /// Calls read so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Adds generated text; returns what is now certain.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            let before = (self.state, self.buf.len());
            match self.state {
                State::Start => self.start(),
                State::Text => self.text(&mut out),
                State::InCall => self.in_call(&mut out),
                State::Json => {}
            }
            if (self.state, self.buf.len()) == before {
                return out;
            }
        }
    }

    /// The text is complete: flushes what was held back.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = Vec::new();
        match self.state {
            State::Json => match self.json_calls(&rest) {
                Some(calls) => {
                    self.calls += calls.len();
                    out.extend(calls.into_iter().map(Piece::Call));
                }
                None => out.push(Piece::Text(rest)),
            },
            State::InCall => {
                // An unclosed call at the end (a stop sequence, or a
                // template that ends calls with end-of-turn) still counts
                // when what follows the marker is a whole call.
                let body = rest.strip_prefix(OPEN).unwrap_or(&rest);
                match self.read_call(body) {
                    Some(call) => {
                        self.calls += 1;
                        out.push(Piece::Call(call));
                    }
                    None => out.push(Piece::Text(rest)),
                }
            }
            State::Start | State::Text => {
                let text = if self.calls > 0 {
                    rest.trim_end()
                } else {
                    &rest
                };
                if !text.is_empty() {
                    out.push(Piece::Text(text.to_string()));
                }
            }
        }
        out
    }

    fn start(&mut self) {
        let trimmed = self.buf.trim_start();
        if trimmed.is_empty() {
            return;
        }
        let json = match self.format {
            ToolFormat::Llama3 => trimmed.starts_with('{') || trimmed.starts_with(PYTHON_TAG),
            ToolFormat::Mistral => trimmed.starts_with('[') || trimmed.starts_with(MISTRAL_TAG),
            ToolFormat::Hermes | ToolFormat::Generic => false,
        };
        let could_be_tag = |tag: &str| tag.starts_with(trimmed) && trimmed.len() < tag.len();
        if !json
            && matches!(self.format, ToolFormat::Llama3 | ToolFormat::Mistral)
            && (could_be_tag(PYTHON_TAG) || could_be_tag(MISTRAL_TAG))
        {
            return;
        }
        self.state = if json { State::Json } else { State::Text };
    }

    fn text(&mut self, out: &mut Vec<Piece>) {
        if matches!(self.format, ToolFormat::Llama3 | ToolFormat::Mistral) {
            // JSON formats: a call only ever opens the output.
            if !self.buf.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut self.buf)));
            }
            return;
        }
        if self.calls > 0 && self.buf.trim_start().len() < self.buf.len() {
            // Between and after calls, whitespace is not content.
            self.buf = self.buf.trim_start().to_string();
        }
        if let Some(at) = self.buf.find(OPEN) {
            if at > 0 {
                out.push(Piece::Text(self.buf[..at].to_string()));
            }
            self.buf.drain(..at);
            self.state = State::InCall;
            return;
        }
        // Hold back a tail that may be the start of the marker.
        let keep = (1..OPEN.len())
            .rev()
            .find(|&n| self.buf.ends_with(&OPEN[..n]))
            .unwrap_or(0);
        let cut = self.buf.len() - keep;
        if cut > 0 {
            out.push(Piece::Text(self.buf[..cut].to_string()));
            self.buf.drain(..cut);
        }
    }

    fn in_call(&mut self, out: &mut Vec<Piece>) {
        // A call ends at its closing tag, or where the next one opens
        // (small models often leave the closing tag out).
        let close = self.buf.find(CLOSE).map(|at| (at, at + CLOSE.len()));
        let reopen = self.buf[OPEN.len()..]
            .find(OPEN)
            .map(|at| (OPEN.len() + at, OPEN.len() + at));
        let Some((end, next)) = [close, reopen].into_iter().flatten().min() else {
            return;
        };
        let whole = self.buf[..next].to_string();
        match self.read_call(&self.buf[OPEN.len()..end]) {
            Some(call) => {
                self.calls += 1;
                out.push(Piece::Call(call));
            }
            None => out.push(Piece::Text(whole.clone())),
        }
        self.buf.drain(..whole.len());
        self.state = State::Text;
    }

    /// Reads the call in `body`: one JSON object, then nothing but
    /// whitespace or the beginning of a marker.
    fn read_call(&self, body: &str) -> Option<ToolCall> {
        let body = body.trim();
        let mut values = serde_json::Deserializer::from_str(body).into_iter::<Value>();
        let value = values.next()?.ok()?;
        let rest = body[values.byte_offset()..].trim();
        let marker_start = |m: &str| m.starts_with(rest);
        if !rest.is_empty() && !marker_start(OPEN) && !marker_start(CLOSE) {
            return None;
        }
        call_from_value(&value, self.format)
    }

    /// Reads the whole output as calls: `[{…}, …]` (Mistral) or objects
    /// separated by `;` (Llama 3). `None` when it is anything else.
    fn json_calls(&self, text: &str) -> Option<Vec<ToolCall>> {
        let text = text.trim();
        let text = text
            .strip_prefix(PYTHON_TAG)
            .or_else(|| text.strip_prefix(MISTRAL_TAG))
            .unwrap_or(text)
            .trim();
        let mut values = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            match stream.next()? {
                Ok(Value::Array(items)) => values.extend(items),
                Ok(v) => values.push(v),
                Err(_) => return None,
            }
            rest = rest[stream.byte_offset()..].trim_start();
            rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
        }
        let calls: Option<Vec<ToolCall>> = values
            .iter()
            .map(|v| call_from_value(v, self.format))
            .collect();
        calls.filter(|c| !c.is_empty())
    }
}
