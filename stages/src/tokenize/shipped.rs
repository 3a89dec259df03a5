//! The chat template a tokenizer's model ships, found where each format keeps it: a GGUF
//! file's `tokenizer.chat_template`; a model directory's chat_template.jinja (transformers 5)
//! or tokenizer_config.json's `chat_template` (a string, or a list of named templates whose
//! `default` is the one `apply_chat_template` uses); a smelt artifact's
//! `smelt_chat_markers`. Also the special tokens the template may name.

use std::path::Path;

use serde_json::Value;

use super::chat::{Markers, Shipped, ShippedTemplate};
use crate::model::gguf::{is_gguf, Gguf};

/// What ships with the tokenizer at `path`: a GGUF file, a model or tokenize directory, or a
/// tokenizer.json (whose directory is read).
pub fn shipped_with(path: &Path) -> Result<Shipped, String> {
    if is_gguf(path) {
        let file = Gguf::read(path)?;
        return Ok(from_gguf(&file));
    }
    match path.is_dir() {
        true => in_dir(path),
        false => path.parent().map_or(Ok(Shipped::default()), in_dir),
    }
}

pub fn from_gguf(file: &Gguf) -> Shipped {
    Shipped {
        template: file
            .chat_template()
            .map(|t| ShippedTemplate::Jinja(t.to_string())),
        specials: file.special_tokens(),
    }
}

/// The template and special tokens in a directory's tokenizer_config.json and
/// chat_template.jinja (both optional).
pub fn in_dir(dir: &Path) -> Result<Shipped, String> {
    let read = |name: &str| -> Result<Option<String>, String> {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", dir.join(name).display())),
        }
    };
    let config: Value = match read("tokenizer_config.json")? {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| format!("{}: {e}", dir.join("tokenizer_config.json").display()))?,
        None => Value::Null,
    };
    let template = if let Ok(markers) =
        serde_json::from_value::<Markers>(config["smelt_chat_markers"].clone())
    {
        Some(ShippedTemplate::Markers(markers))
    } else if let Some(source) = read("chat_template.jinja")? {
        Some(ShippedTemplate::Jinja(source))
    } else {
        config_template(&config["chat_template"]).map(ShippedTemplate::Jinja)
    };
    let specials = ["bos_token", "eos_token", "unk_token", "pad_token"]
        .into_iter()
        .filter_map(|name| {
            let token = &config[name];
            // A string, or an AddedToken written out ({"content": …}).
            let text = token.as_str().or_else(|| token["content"].as_str())?;
            Some((name.to_string(), text.to_string()))
        })
        .collect();
    Ok(Shipped { template, specials })
}

/// tokenizer_config.json's `chat_template`: a string, or `[{name, template}]` (the `default`).
fn config_template(value: &Value) -> Option<String> {
    if let Some(text) = value.as_str() {
        return Some(text.to_string());
    }
    value.as_array()?.iter().find(|t| t["name"] == "default")?["template"]
        .as_str()
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_ships_its_jinja_file_before_its_config_and_markers_before_both() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "chat_template": [{ "name": "tool_use", "template": "T" }, { "name": "default", "template": "D" }],
            "bos_token": { "content": "<s>", "special": true },
            "eos_token": "</s>",
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let shipped = in_dir(dir.path()).unwrap();
        assert!(matches!(shipped.template, Some(ShippedTemplate::Jinja(ref t)) if t == "D"));
        assert_eq!(
            shipped.specials,
            vec![
                ("bos_token".to_string(), "<s>".to_string()),
                ("eos_token".to_string(), "</s>".to_string())
            ]
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        let shipped = shipped_with(&dir.path().join("tokenizer.json")).unwrap();
        assert!(matches!(shipped.template, Some(ShippedTemplate::Jinja(ref t)) if t == "J"));
        let mut config = config;
        config["smelt_chat_markers"] =
            serde_json::json!({ "turn_start": "{role}: ", "turn_end": "\n" });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let shipped = in_dir(dir.path()).unwrap();
        assert!(
            matches!(shipped.template, Some(ShippedTemplate::Markers(ref m)) if m.turn_start == "{role}: ")
        );
        assert!(in_dir(&dir.path().join("nothing"))
            .unwrap()
            .template
            .is_none());
    }
}
