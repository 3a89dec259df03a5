//! Chat templates: conversations and preference pairs rendered as token ids plus a loss mask
//! that is 1 only on what the assistant says, so fine-tuning learns the responses and not the
//! prompts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::ParamProblem;

use super::encoder::Encoder;
use crate::records::{Message, Record};

/// How a conversation becomes text: each turn is `turn_start` (with `{role}` replaced by the
/// turn's role; it must have one), the content, then `turn_end`. The default is ChatML, whose markers are special
/// tokens of a trained tokenizer.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    #[serde(default = "default_turn_start")]
    pub turn_start: String,
    #[serde(default = "default_turn_end")]
    pub turn_end: String,
}

fn default_turn_start() -> String {
    "<|im_start|>{role}\n".into()
}

fn default_turn_end() -> String {
    "<|im_end|>\n".into()
}

impl Default for ChatTemplate {
    fn default() -> Self {
        ChatTemplate {
            turn_start: default_turn_start(),
            turn_end: default_turn_end(),
        }
    }
}

/// One tokenized example: ids and, per id, whether the loss counts it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

impl Example {
    fn push(&mut self, encoder: &Encoder, text: &str, trained: bool) -> Result<(), String> {
        encoder.encode(text, &mut self.ids)?;
        self.mask.resize(self.ids.len(), u8::from(trained));
        Ok(())
    }

    fn turn(
        &mut self,
        encoder: &Encoder,
        template: &ChatTemplate,
        role: &str,
        content: &str,
    ) -> Result<(), String> {
        let assistant = role == "assistant";
        let (start, lead) = template.start(role);
        self.push(encoder, &start, false)?;
        self.push(encoder, &format!("{lead}{content}"), assistant)?;
        // The end marker is trained too: the model learns to stop.
        self.push(encoder, &template.turn_end, assistant)
    }

    /// Cuts the example to `max_length` ids; says whether it was longer.
    pub fn truncate(&mut self, max_length: usize) -> bool {
        let longer = self.ids.len() > max_length;
        self.ids.truncate(max_length);
        self.mask.truncate(max_length);
        longer
    }

    pub fn trainable(&self) -> usize {
        self.mask.iter().filter(|&&m| m == 1).count()
    }
}

impl ChatTemplate {
    /// A template whose turns do not say who speaks renders a user's turn and an assistant's
    /// alike (paths from the stage's `with:`).
    pub fn problems(&self) -> Vec<ParamProblem> {
        if self.turn_start.contains("{role}") {
            return Vec::new();
        }
        vec![ParamProblem::new(
            "chat_template.turn_start",
            format!(
                "`chat_template.turn_start` ({:?}) has no `{{role}}`: every turn would start \
                 alike, and the model could not tell the user's from the assistant's",
                self.turn_start
            ),
        )
        .help("write `{role}` where the role goes, as in \"<|im_start|>{role}\\n\"")]
    }

    /// A conversation. Each turn is encoded on its own, so the ids at a turn boundary are the
    /// same whatever surrounds it (generation encodes prompts the same way).
    pub fn conversation(
        &self,
        encoder: &Encoder,
        record: &Record,
        messages: &[Message],
    ) -> Result<Example, String> {
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(format!(
                "record `{}` has no assistant turn: nothing to train on (roles: {})",
                record.id,
                messages
                    .iter()
                    .map(|m| m.role.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut example = Example::default();
        for message in messages {
            example.turn(encoder, self, &message.role, &message.content)?;
        }
        Ok(example)
    }

    /// The ids a model continues to answer `messages`: every turn, then the assistant's
    /// `turn_start`, encoded turn by turn exactly as training examples are (encoding the
    /// rendered text in one piece gives other ids at the boundaries, such as `: What` for
    /// `: ` + `What`, and a fine-tuned model never saw those).
    pub fn generation_prompt(
        &self,
        encoder: &Encoder,
        messages: &[Message],
    ) -> Result<Vec<u32>, String> {
        let mut example = Example::default();
        for message in messages {
            example.turn(encoder, self, &message.role, &message.content)?;
        }
        example.push(encoder, &self.start("assistant").0, false)?;
        Ok(example.ids)
    }

    /// A turn's start marker, and what goes before its content. A space that ends the marker
    /// (as in `user: `) is encoded with the content, as running text would be: byte-level BPE
    /// keeps a word's leading space in its token (` music`), and a model that must begin every
    /// answer with a bare word (`m`, `usic`) learns far slower.
    fn start(&self, role: &str) -> (String, &'static str) {
        let start = self.turn_start.replace("{role}", role);
        match start.strip_suffix(' ') {
            Some(trimmed) if !trimmed.ends_with(char::is_whitespace) => (trimmed.to_string(), " "),
            _ => (start, ""),
        }
    }

    /// The ids of an assistant answer and its end marker, as training encodes them after a
    /// [`Self::generation_prompt`].
    pub fn answer(&self, encoder: &Encoder, answer: &str) -> Result<Vec<u32>, String> {
        let mut example = Example::default();
        example.push(
            encoder,
            &format!("{}{answer}", self.start("assistant").1),
            true,
        )?;
        example.push(encoder, &self.turn_end, true)?;
        Ok(example.ids)
    }

    /// A preference pair: the prompt as a user turn, each answer as the assistant's.
    pub fn preference(
        &self,
        encoder: &Encoder,
        prompt: &str,
        chosen: &str,
        rejected: &str,
    ) -> Result<(Example, Example), String> {
        let answer = |response: &str| -> Result<Example, String> {
            let mut example = Example::default();
            example.turn(encoder, self, "user", prompt)?;
            example.turn(encoder, self, "assistant", response)?;
            Ok(example)
        };
        Ok((answer(chosen)?, answer(rejected)?))
    }

    /// The same template in Jinja, for `tokenizer_config.json`: transformers'
    /// `apply_chat_template` then renders conversations as the stage does.
    pub fn jinja(&self) -> String {
        let literal = |text: &str| {
            let escaped = text
                .replace('\\', "\\\\")
                .replace('\'', "\\'")
                .replace('\n', "\\n");
            format!("{{{{ '{escaped}' }}}}")
        };
        let (before, after) = self
            .turn_start
            .split_once("{role}")
            .unwrap_or((&self.turn_start, ""));
        let start = format!(
            "{}{{{{ message['role'] }}}}{}",
            literal(before),
            literal(after)
        );
        // Without a trailing space, as `generation_prompt` encodes it (see `start`).
        let generation = self.start("assistant").0;
        format!(
            "{{% for message in messages %}}{start}{{{{ message['content'] }}}}{}{{% endfor %}}\
             {{% if add_generation_prompt %}}{}{{% endif %}}",
            literal(&self.turn_end),
            literal(&generation)
        )
    }
}
