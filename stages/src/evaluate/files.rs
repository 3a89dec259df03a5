//! The JSONL files next to the pipeline that `multiple_choice`, `bleu` and `chrf` read. One
//! reader per format, used by the run and by `smelt validate` (the files need nothing built, so
//! their mistakes are found before anything runs).

use std::io::{BufRead, BufReader};
use std::path::Path;

/// One multiple-choice question: `{"question": …, "choices": [...], "answer": index}`.
pub struct ChoiceQuestion {
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

/// One generation task with its reference: `{"prompt": …, "reference": …}`.
pub struct Reference {
    pub prompt: String,
    pub reference: String,
}

/// The questions of `file` (relative to `dir`, and named as written in errors).
pub fn choice_questions(dir: &Path, file: &str) -> Result<Vec<ChoiceQuestion>, String> {
    items(dir, file, |item, at| {
        let question = item["question"]
            .as_str()
            .ok_or_else(|| format!("{at}: no `question` string"))?;
        let choices: Vec<String> = item["choices"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if choices.len() < 2 {
            return Err(format!("{at}: `choices` needs at least two strings"));
        }
        let answer = item["answer"]
            .as_u64()
            .and_then(|a| usize::try_from(a).ok())
            .filter(|&a| a < choices.len())
            .ok_or_else(|| format!("{at}: `answer` must be the index of a choice"))?;
        Ok(ChoiceQuestion {
            question: question.to_string(),
            choices,
            answer,
        })
    })
}

/// The prompts and references of `file`.
pub fn references(dir: &Path, file: &str) -> Result<Vec<Reference>, String> {
    items(dir, file, |item, at| {
        match (item["prompt"].as_str(), item["reference"].as_str()) {
            (Some(prompt), Some(reference)) => Ok(Reference {
                prompt: prompt.to_string(),
                reference: reference.to_string(),
            }),
            _ => Err(format!("{at}: needs `prompt` and `reference` strings")),
        }
    })
}

/// Each non-blank line of `file` as JSON, turned into an item by `read` (given the line's
/// `file:line` for its errors); an error for a file without items.
fn items<T>(
    dir: &Path,
    file: &str,
    read: impl Fn(&serde_json::Value, &str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let opened = std::fs::File::open(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
    let mut found = Vec::new();
    for (index, line) in BufReader::new(opened).lines().enumerate() {
        let at = format!("{file}:{}", index + 1);
        let line = line.map_err(|e| format!("{at}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let item: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("{at}: not JSON: {e}"))?;
        found.push(read(&item, &at)?);
    }
    if found.is_empty() {
        return Err(format!("{file}: no questions"));
    }
    Ok(found)
}
