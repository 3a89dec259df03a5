//! Chat templates: conversations and preference pairs rendered as token ids plus a loss mask
//! that is 1 only on what the assistant says, so fine-tuning learns the responses and not the
//! prompts.
//!
//! Two kinds of template: smelt's own turn markers ([`Markers`], encoded turn by turn), and the
//! Jinja template a model ships ([`JinjaTemplate`]), rendered and encoded in one piece exactly
//! as transformers' `apply_chat_template` does, the assistant's tokens found by rendering the
//! conversation turn by turn.

use std::ops::Range;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::ParamProblem;

use super::encoder::Encoder;
use super::jinja::JinjaTemplate;
use crate::records::{Message, Record};

/// `chat_template` in a stage's `with:`: how conversations become tokens. Left out, it is the
/// template the tokenizer's model ships (a GGUF file's, or a model directory's
/// `chat_template.jinja` / tokenizer_config.json), or smelt's ChatML markers when the
/// tokenizer has none (a trained one).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(untagged)]
pub enum ChatTemplate {
    /// `model`: the model's own template; an error when it ships none.
    Model(ModelTemplate),
    /// A Jinja template, rendered as transformers renders chat templates.
    Jinja(JinjaSource),
    /// Turn markers.
    Markers(Markers),
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelTemplate {
    Model,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JinjaSource {
    /// The template's Jinja source (`messages`, `add_generation_prompt`, `bos_token`, …).
    pub jinja: String,
}

impl ChatTemplate {
    /// Problems visible in the params alone (paths from the stage's `with:`).
    pub fn problems(&self) -> Vec<ParamProblem> {
        match self {
            ChatTemplate::Markers(markers) => markers.problems(),
            ChatTemplate::Jinja(source) => match JinjaTemplate::new(&source.jinja, Vec::new()) {
                Ok(_) => Vec::new(),
                Err(e) => vec![ParamProblem::new("chat_template.jinja", e)],
            },
            ChatTemplate::Model(_) => Vec::new(),
        }
    }
}

/// What a tokenizer's model ships for chat: its template (if any) and the special tokens by
/// the names templates use (`bos_token` → `<|im_start|>`).
#[derive(Clone, Debug, Default)]
pub struct Shipped {
    pub template: Option<ShippedTemplate>,
    pub specials: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
pub enum ShippedTemplate {
    /// A smelt tokenize artifact's markers (or a model trained on one).
    Markers(Markers),
    Jinja(String),
}

/// A template ready to encode with.
#[derive(Debug)]
pub enum ChatFormat {
    Markers(Markers),
    Jinja(Box<JinjaTemplate>),
}

impl ChatFormat {
    /// The format `param` asks for, given what the tokenizer's model ships.
    pub fn resolve(param: Option<&ChatTemplate>, shipped: &Shipped) -> Result<Self, String> {
        let jinja = |source: &str| {
            JinjaTemplate::new(source, shipped.specials.clone())
                .map(|t| ChatFormat::Jinja(Box::new(t)))
        };
        match (param, &shipped.template) {
            (Some(ChatTemplate::Markers(markers)), _) => Ok(ChatFormat::Markers(markers.clone())),
            (Some(ChatTemplate::Jinja(source)), _) => jinja(&source.jinja),
            (_, Some(ShippedTemplate::Markers(markers))) => {
                Ok(ChatFormat::Markers(markers.clone()))
            }
            (_, Some(ShippedTemplate::Jinja(source))) => jinja(source),
            (Some(ChatTemplate::Model(_)), None) => Err(
                "`chat_template: model`, but the tokenizer's model ships no chat template: \
                 write one (`chat_template: { jinja: ... }`) or give turn markers"
                    .into(),
            ),
            (None, None) => Ok(ChatFormat::Markers(Markers::default())),
        }
    }

    /// A conversation: every turn, the assistant's trained.
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
        self.encode(encoder, messages)
            .map_err(|e| format!("record `{}`: {e}", record.id))
    }

    fn encode(&self, encoder: &Encoder, messages: &[Message]) -> Result<Example, String> {
        match self {
            ChatFormat::Markers(markers) => markers.conversation(encoder, messages),
            ChatFormat::Jinja(template) => jinja_conversation(template, encoder, messages),
        }
    }

    /// The ids a model continues to answer `messages`.
    pub fn generation_prompt(
        &self,
        encoder: &Encoder,
        messages: &[Message],
    ) -> Result<Vec<u32>, String> {
        match self {
            ChatFormat::Markers(markers) => markers.generation_prompt(encoder, messages),
            ChatFormat::Jinja(template) => {
                let mut ids = Vec::new();
                encoder.encode(&template.render(messages, true)?, &mut ids)?;
                Ok(ids)
            }
        }
    }

    /// A preference pair: the prompt as a user turn, each answer as the assistant's.
    pub fn preference(
        &self,
        encoder: &Encoder,
        prompt: &str,
        chosen: &str,
        rejected: &str,
    ) -> Result<(Example, Example), String> {
        let answer = |response: &str| {
            self.encode(
                encoder,
                &[message("user", prompt), message("assistant", response)],
            )
        };
        Ok((answer(chosen)?, answer(rejected)?))
    }

    /// `answer` to a user's `prompt` as a scorer sees it: the context before the first trained
    /// id, and the answer's ids (its end of turn included), as training encodes them.
    pub fn scored_answer(
        &self,
        encoder: &Encoder,
        prompt: &str,
        answer: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), String> {
        let mut example = self.encode(
            encoder,
            &[message("user", prompt), message("assistant", answer)],
        )?;
        let first = example
            .mask
            .iter()
            .position(|&m| m == 1)
            .unwrap_or(example.ids.len());
        let answer = example.ids.split_off(first);
        Ok((example.ids, answer))
    }

    /// The id that ends an assistant's turn (generation stops there): the first token after
    /// an answer's text.
    pub fn end_of_turn(&self, encoder: &Encoder) -> Result<Option<u32>, String> {
        let text = match self {
            ChatFormat::Markers(markers) => markers.turn_end.clone(),
            ChatFormat::Jinja(template) => {
                const PROBE: &str = "Fine, thanks.";
                let turns = [message("user", "Hello?"), message("assistant", PROBE)];
                let rendered = template.render(&turns, false)?;
                match rendered.rfind(PROBE) {
                    Some(at) => rendered[at + PROBE.len()..].to_string(),
                    None => String::new(),
                }
            }
        };
        let mut ids = Vec::new();
        encoder.encode(text.trim_start_matches(' ').trim_end(), &mut ids)?;
        Ok(ids.first().copied())
    }

    /// The template for tokenizer_config.json (`chat_template`, which transformers renders) and,
    /// for markers, `smelt_chat_markers`, so that stages downstream encode as this one did.
    pub fn write_into(&self, config: &mut serde_json::Value) {
        match self {
            ChatFormat::Markers(markers) => {
                config["chat_template"] = markers.jinja().into();
                config["smelt_chat_markers"] = serde_json::json!({
                    "turn_start": markers.turn_start,
                    "turn_end": markers.turn_end,
                });
            }
            ChatFormat::Jinja(template) => {
                config["chat_template"] = template.source().into();
                for (name, token) in template.specials() {
                    config[name.as_str()] = token.as_str().into();
                }
            }
        }
    }
}

fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

/// A conversation through a Jinja template, encoded in one piece as `apply_chat_template`
/// encodes it. The assistant's text of turn `i` is what `messages[..= i]` renders beyond the
/// generation prompt of `messages[.. i]`; this needs each render to begin with the one before
/// (true of ChatML, Llama 3 and most templates; a template that rewrites earlier turns is refused).
fn jinja_conversation(
    template: &JinjaTemplate,
    encoder: &Encoder,
    messages: &[Message],
) -> Result<Example, String> {
    let whole = template.render(messages, false)?;
    let mut spans: Vec<Range<usize>> = Vec::new();
    for (i, turn) in messages.iter().enumerate() {
        if turn.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let through = template.render(&messages[..=i], false)?;
        if !through.starts_with(&before) || !whole.starts_with(&through) {
            return Err(format!(
                "the chat template does not render conversations turn by turn (what it renders \
                 for the first {} turns is not the beginning of what it renders for more), so \
                 the assistant's tokens cannot be told from the prompt's",
                i + 1
            ));
        }
        spans.push(before.len()..through.len());
    }
    let mut example = Example::default();
    let mut starts = Vec::new();
    encoder.encode_with_starts(&whole, &mut example.ids, &mut starts)?;
    example.mask = starts
        .iter()
        .map(|start| u8::from(spans.iter().any(|span| span.contains(start))))
        .collect();
    Ok(example)
}

/// How a conversation becomes text: each turn is `turn_start` (with `{role}` replaced by the
/// turn's role; it must have one), the content, then `turn_end`. The default is ChatML, whose markers are special
/// tokens of a trained tokenizer.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Markers {
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

impl Default for Markers {
    fn default() -> Self {
        Markers {
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
        template: &Markers,
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

impl Markers {
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
    fn conversation(&self, encoder: &Encoder, messages: &[Message]) -> Result<Example, String> {
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
    fn generation_prompt(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::Gguf;
    use crate::testing::{fixtures, smollm2};
    use serde_json::Value;
    use tokenizers::Tokenizer;

    fn messages(conversation: &Value) -> Vec<Message> {
        serde_json::from_value(conversation.clone()).unwrap()
    }

    fn ids(value: &Value) -> Vec<u32> {
        serde_json::from_value(value.clone()).unwrap()
    }

    /// tests/fixtures/chat_templates.json (make_chat_template_fixture.py): SmolLM2's own
    /// template from its GGUF file, Llama 3's header format, an [INST] format and ChatML with
    /// generation tags, each encoded as transformers' `apply_chat_template` encodes it; the
    /// tagged one's assistant mask as transformers computes it.
    #[test]
    fn jinja_templates_encode_as_transformers_apply_chat_template() {
        let text = std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap();
        let fixture: Value = serde_json::from_str(&text).unwrap();
        let file = Gguf::read(&smollm2()).unwrap();
        let json = file.tokenizer_json().unwrap().to_string();
        let tokenizer = Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let encoder = Encoder::new(&tokenizer).unwrap();
        let shipped = super::super::shipped::from_gguf(&file);
        for (name, template) in fixture["templates"].as_object().unwrap() {
            let param = match name.as_str() {
                "smollm2" => None,
                _ => Some(ChatTemplate::Jinja(JinjaSource {
                    jinja: template["source"].as_str().unwrap().into(),
                })),
            };
            let format = ChatFormat::resolve(param.as_ref(), &shipped).unwrap();
            let conversations = fixture["conversations"].as_array().unwrap();
            for (conversation, case) in conversations
                .iter()
                .zip(template["cases"].as_array().unwrap())
            {
                let turns = messages(conversation);
                let example = format.encode(&encoder, &turns).unwrap();
                assert_eq!(example.ids, ids(&case["ids"]), "{name}: {turns:?}");
                let prompt = format
                    .generation_prompt(&encoder, &turns[..turns.len() - 1])
                    .unwrap();
                assert_eq!(
                    prompt,
                    ids(&case["prompt"]),
                    "{name}: the generation prompt"
                );
                // The tokens of the last answer are trained: what the whole renders beyond the
                // generation prompt. (The prompt's ids need not begin the whole's: Llama 3's
                // `\n\n` is one token at the end of a text and two before a word.)
                let ChatFormat::Jinja(jinja) = &format else {
                    panic!("{name} is a Jinja template")
                };
                let whole = jinja.render(&turns, false).unwrap();
                let before = jinja.render(&turns[..turns.len() - 1], true).unwrap();
                let last = example.mask.iter().rposition(|&m| m == 0).unwrap() + 1;
                let answer = tokenizer.decode(&example.ids[last..], false).unwrap();
                assert_eq!(answer, whole[before.len()..], "{name}");
                if let Some(mask) = case.get("assistant_mask") {
                    let mask: Vec<u8> = serde_json::from_value(mask.clone()).unwrap();
                    assert_eq!(example.mask, mask, "{name}: transformers' assistant mask");
                }
            }
        }
    }

    #[test]
    fn the_end_of_a_turn_is_found_by_rendering_one() {
        let file = Gguf::read(&smollm2()).unwrap();
        let json = file.tokenizer_json().unwrap().to_string();
        let encoder = Encoder::new(&Tokenizer::from_bytes(json.as_bytes()).unwrap()).unwrap();
        let shipped = super::super::shipped::from_gguf(&file);
        let own = ChatFormat::resolve(None, &shipped).unwrap();
        assert_eq!(own.end_of_turn(&encoder).unwrap(), Some(2), "<|im_end|>");
        let markers = ChatFormat::resolve(None, &Shipped::default()).unwrap();
        assert!(matches!(markers, ChatFormat::Markers(_)));
        assert_eq!(markers.end_of_turn(&encoder).unwrap(), Some(2));
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_refused() {
        // Drops every assistant turn but the last, as some reasoning models' templates do.
        let source = "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}";
        let template = JinjaTemplate::new(source, Vec::new()).unwrap();
        let turns = [
            message("user", "a"),
            message("assistant", "b"),
            message("user", "c"),
            message("assistant", "d"),
        ];
        let format = ChatFormat::Jinja(Box::new(template));
        let chars = Tokenizer::from_bytes(
            serde_json::json!({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let encoder = Encoder::new(&chars).unwrap();
        let err = format.encode(&encoder, &turns).unwrap_err();
        assert!(
            err.contains("does not render conversations turn by turn"),
            "{err}"
        );
    }

    #[test]
    fn model_asks_for_a_template_the_model_ships() {
        let err = ChatFormat::resolve(
            Some(&ChatTemplate::Model(ModelTemplate::Model)),
            &Shipped::default(),
        )
        .unwrap_err();
        assert!(err.contains("ships no chat template"), "{err}");
        let parse = |v: Value| serde_json::from_value::<ChatTemplate>(v).unwrap();
        assert_eq!(
            parse(serde_json::json!("model")),
            ChatTemplate::Model(ModelTemplate::Model)
        );
        assert!(matches!(
            parse(serde_json::json!({ "jinja": "x" })),
            ChatTemplate::Jinja(_)
        ));
        assert!(matches!(
            parse(serde_json::json!({ "turn_end": "\n" })),
            ChatTemplate::Markers(_)
        ));
    }
}
