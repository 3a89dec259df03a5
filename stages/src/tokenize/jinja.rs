//! Chat templates in Jinja, the form models ship them in (tokenizer_config.json's
//! `chat_template`, transformers 5's chat_template.jinja, a GGUF file's
//! `tokenizer.chat_template`), rendered as transformers' `apply_chat_template` renders them:
//! blocks trimmed and left-stripped, loop controls, Python's string and dict methods,
//! `raise_exception`, a `tojson` that writes what Python's `json.dumps` writes, and the
//! tokenizer's special tokens by name (`bos_token`, `eos_token`).
//!
//! transformers also offers `strftime_now`; it is left out on purpose, because an artifact must
//! not depend on the day it was built. Templates that use it (Llama 3.2's) test for it and fall
//! back to a fixed date.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};

use crate::records::Message;

const NAME: &str = "chat_template";

/// A compiled chat template and the special tokens it may name.
pub struct JinjaTemplate {
    env: Environment<'static>,
    source: String,
    specials: Vec<(String, String)>,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("source", &self.source)
            .field("specials", &self.specials)
            .finish()
    }
}

impl JinjaTemplate {
    /// Compiles `source`; `specials` are the names a template may use for the tokenizer's
    /// special tokens (`bos_token` → `<|im_start|>`).
    pub fn new(source: &str, specials: Vec<(String, String)>) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", python_json);
        env.add_template_owned(NAME, without_generation_tags(source))
            .map_err(|e| format!("the chat template does not compile: {}", describe(&e)))?;
        Ok(JinjaTemplate {
            env,
            source: source.to_string(),
            specials,
        })
    }

    /// The template as the model wrote it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens the template is rendered with.
    pub fn specials(&self) -> &[(String, String)] {
        &self.specials
    }

    /// `messages` as text; with `add_generation_prompt`, followed by what opens the
    /// assistant's answer.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_iter([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut context: Vec<(String, Value)> = self
            .specials
            .iter()
            .map(|(name, token)| (name.clone(), Value::from(token.as_str())))
            .collect();
        context.push(("messages".into(), Value::from(messages)));
        context.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let template = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        template
            .render(Value::from_iter(context))
            .map_err(|e| format!("the chat template failed: {}", describe(&e)))
    }
}

/// An error with its cause chain (minijinja puts the line in the detail).
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// transformers' `{% generation %}…{% endgeneration %}` marks the assistant's text for its
/// own masks; smelt finds those spans by rendering turn by turn, so the tags become blocks
/// that render their body (whitespace control kept).
fn without_generation_tags(source: &str) -> String {
    let tags = regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("valid regex");
    tags.replace_all(source, |c: &regex::Captures| {
        let keyword = if c.get(2).is_some() {
            "endif"
        } else {
            "if true"
        };
        format!("{{%{} {keyword} {}%}}", &c[1], &c[3])
    })
    .into_owned()
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: Python's `json.dumps(value, ensure_ascii=False,
/// indent=indent)`, so `", "` and `": "` between items when not indented, and no HTML
/// escaping (minijinja's own escapes `<`, which would change a prompt's tokens).
fn python_json(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, sort_keys.unwrap_or(false), 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => {
            let text = value.as_str().unwrap_or_default();
            out.push_str(&serde_json::to_string(text).map_err(json_error)?);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                let name = key.as_str().map_or_else(|| key.to_string(), String::from);
                out.push_str(&serde_json::to_string(&name).map_err(json_error)?);
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot write a {} as JSON", value.kind()),
            ))
        }
    }
    Ok(())
}

fn json_error(e: serde_json::Error) -> Error {
    Error::new(ErrorKind::InvalidOperation, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn blocks_are_trimmed_and_python_methods_work() {
        let source = "{% for m in messages %}\n  {% if m['role'] == 'user' %}\n{{ m['content'].strip() | upper }}\n  {% endif %}\n{% endfor %}";
        let template = JinjaTemplate::new(source, Vec::new()).unwrap();
        let text = template
            .render(
                &[message("user", "  hi "), message("assistant", "x")],
                false,
            )
            .unwrap();
        assert_eq!(text, "HI\n");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let source = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn comes first') }}{% endif %}";
        let template = JinjaTemplate::new(source, Vec::new()).unwrap();
        let err = template.render(&[message("user", "x")], false).unwrap_err();
        assert!(err.contains("a system turn comes first"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let source = "{{ {'a': [1, 'é<'], 'b': none} | tojson }}|{{ {'a': 1} | tojson(indent=2) }}";
        let template = JinjaTemplate::new(source, Vec::new()).unwrap();
        let text = template.render(&[], false).unwrap();
        assert_eq!(text, "{\"a\": [1, \"é<\"], \"b\": null}|{\n  \"a\": 1\n}");
    }

    #[test]
    fn generation_tags_render_their_body_and_specials_are_named() {
        let source = "{{ bos_token }}{% for m in messages %}{%- generation -%} {{ m['content'] }} {%- endgeneration %}{% endfor %}{% if strftime_now is defined %}dated{% endif %}";
        let specials = vec![("bos_token".to_string(), "<s>".to_string())];
        let template = JinjaTemplate::new(source, specials).unwrap();
        assert_eq!(
            template.render(&[message("user", "a")], false).unwrap(),
            "<s>a"
        );
    }

    #[test]
    fn a_template_that_does_not_compile_says_where() {
        let err = JinjaTemplate::new("{% for m in messages %}", Vec::new()).unwrap_err();
        assert!(err.contains("does not compile"), "{err}");
    }
}
