//! Chat templates: the model's own Jinja template, rendered with minijinja
//! in the same mode Hugging Face's `apply_chat_template` uses.

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::tools::ToolFormat;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
    /// The calls an assistant message made.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<MessageToolCall>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The function a `tool` message answers for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// A call in an assistant message, in the OpenAI shape templates read
/// (`tool_call.function.name`, `tool_call.function.arguments`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MessageToolCall {
    /// The call's id.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// What was called.
    pub function: FunctionCall,
}

/// The function a call names and its arguments (an object: templates
/// write it out with `tojson`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments.
    pub arguments: serde_json::Value,
}

/// A compiled chat template with the special-token texts it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    tool_format: ToolFormat,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are exposed to it by those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            tool_format: ToolFormat::detect(source),
        })
    }

    /// How the template's model family writes tool calls, read from the
    /// template ([`ToolFormat::Generic`] when it renders no tools).
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Renders `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt` is set.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Like [`ChatTemplate::render`], passing `tools` (OpenAI-shaped
    /// function definitions) to the template as transformers does.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nDefault<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t.render(&[msg("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nDefault<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[msg("system", "S"), msg("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip() }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[msg("user", "  x ")], false).unwrap(), "<s>x");
        let err = t.render(&[msg("assistant", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn tools_and_calls_reach_the_template() {
        // A small Hermes-style template written for this test.
        let src = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}\
{% for m in messages %}{{ m.role }}:{{ m.content }}\
{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>{% endfor %}\
{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}\n{% endfor %}<tool_call>";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.tool_format(), ToolFormat::Hermes);
        let mut call = msg("assistant", "");
        call.tool_calls.push(MessageToolCall {
            id: "c1".into(),
            kind: "function",
            function: FunctionCall {
                name: "f".into(),
                arguments: serde_json::json!({"x": 1}),
            },
        });
        let mut result = msg("tool", "42");
        result.tool_call_id = Some("c1".into());
        let tools = [serde_json::json!({"type": "function", "function": {"name": "f"}})];
        let out = t
            .render_with_tools(&[msg("user", "hi"), call, result], Some(&tools), false)
            .unwrap();
        assert_eq!(
            out,
            // (trim_blocks drops the newline after each block tag, as in transformers)
            "TOOLS:f;user:hiassistant:<tool_call>f {\"x\":1}</tool_call>tool:42[c1]<tool_call>"
        );
        // Without tools, `tools` is undefined-falsy and plain messages render as before.
        let plain = t.render(&[msg("user", "hi")], false).unwrap();
        assert_eq!(plain, "user:hi<tool_call>");
    }
}
