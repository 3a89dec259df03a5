//! Built-in generators, so a pipeline runs offline and learns something measurable. Every
//! generator is deterministic for a seed, and every answer it writes is correct (the rejected
//! answers of preference pairs are plausible and wrong).

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::records::{Message, Record};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Generator {
    /// Short narratives from a small grammar.
    Stories,
    /// One equation per document, such as `12+7=19`.
    Arithmetic,
    /// User questions (arithmetic, simple instructions) with the assistant's correct answer.
    Chat,
    /// A prompt with a correct (chosen) and a plausible wrong (rejected) answer.
    Preferences,
    /// The chat tasks as plain text (`Question: … Answer: …`), as pretraining data would hold
    /// them: a base model learns the words and facts, and fine-tuning only the chat format.
    Qa,
}

impl Generator {
    pub fn name(self) -> &'static str {
        match self {
            Generator::Stories => "stories",
            Generator::Arithmetic => "arithmetic",
            Generator::Chat => "chat",
            Generator::Preferences => "preferences",
            Generator::Qa => "qa",
        }
    }
}

/// The questions of `chat`, `preferences` and `qa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// `What is 12+7?` → `12+7=19` (operands up to 99 for + and -, 12 for ×).
    Arithmetic,
    /// `Repeat the word cat 3 times.` → `cat cat cat`.
    Repeat,
    /// `What is the opposite of hot?` → `cold` (eight pairs).
    Opposite,
    /// `Spell the word cat backwards.` → `tac`.
    Backwards,
    /// `What is the last word of: fox key apple?` → `apple` (the near miss: the first word).
    LastWord,
    /// `What is the first word of: fox key apple?` → `fox` (the near miss: the last word).
    FirstWord,
    /// `What number comes after 41?` → `42`.
    Successor,
}

impl TaskKind {
    pub const ALL: [TaskKind; 7] = [
        TaskKind::Arithmetic,
        TaskKind::Repeat,
        TaskKind::Opposite,
        TaskKind::Backwards,
        TaskKind::LastWord,
        TaskKind::Successor,
        TaskKind::FirstWord,
    ];
}

/// `documents` records from `generator`, the same for the same seed, with every kind of
/// question.
#[cfg(test)]
pub fn generate(generator: Generator, documents: u64, seed: u64) -> impl Iterator<Item = Record> {
    generate_with(generator, documents, seed, &TaskKind::ALL)
}

/// As [`generate`]; questions are drawn evenly from `tasks` (for the generators that ask
/// questions).
pub fn generate_with(
    generator: Generator,
    documents: u64,
    seed: u64,
    tasks: &[TaskKind],
) -> impl Iterator<Item = Record> {
    let tasks = tasks.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let source = format!("synthetic:{}:seed{seed}", generator.name());
    (0..documents).map(move |i| {
        let id = format!("{source}#{i}");
        match generator {
            Generator::Stories => Record::text(id, story(&mut rng), &source),
            Generator::Arithmetic => {
                let (question, answer) = equation(&mut rng);
                Record::text(id, format!("{question}={answer}"), &source)
            }
            Generator::Chat => {
                let task = task(&mut rng, &tasks);
                let messages = vec![
                    Message {
                        role: "user".into(),
                        content: task.prompt,
                    },
                    Message {
                        role: "assistant".into(),
                        content: task.answer,
                    },
                ];
                Record::chat(id, messages, &source)
            }
            Generator::Preferences => {
                let task = task(&mut rng, &tasks);
                Record::preference(id, task.prompt, task.answer, task.wrong, &source)
            }
            Generator::Qa => {
                let task = task(&mut rng, &tasks);
                let text = format!("Question: {} Answer: {}", task.prompt, task.answer);
                Record::text(id, text, &source)
            }
        }
    })
}

const NAMES: &[&str] = &[
    "Tom", "Lily", "Max", "Mia", "Sam", "Anna", "Ben", "Lucy", "Leo", "Zoe",
];
const ANIMALS: &[&str] = &[
    "fox", "rabbit", "bear", "cat", "dog", "owl", "mouse", "duck",
];
const ADJECTIVES: &[&str] = &[
    "little", "brave", "curious", "kind", "sleepy", "happy", "clever", "shy",
];
const PLACES: &[&str] = &[
    "forest", "village", "garden", "river", "hill", "farm", "meadow", "lake",
];
const OBJECTS: &[&str] = &[
    "ball", "kite", "apple", "book", "hat", "stone", "key", "shell",
];
const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "shiny", "tiny", "small", "round",
];
const FEELINGS: &[&str] = &["happy", "proud", "surprised", "glad", "excited"];

fn pick<'a>(rng: &mut ChaCha8Rng, words: &[&'a str]) -> &'a str {
    words.choose(rng).expect("word lists are not empty")
}

fn story(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, NAMES);
    let animal = pick(rng, ANIMALS);
    let home = pick(rng, PLACES);
    let object = pick(rng, OBJECTS);
    let color = pick(rng, COLORS);
    let friend = pick(rng, NAMES);
    let friend_animal = pick(rng, ANIMALS);
    let mut sentences = vec![
        format!(
            "Once upon a time, there was a {} {animal} named {name}.",
            pick(rng, ADJECTIVES)
        ),
        format!("{name} lived near the {home}."),
        format!(
            "One day, {name} found a {color} {object} by the {}.",
            pick(rng, PLACES)
        ),
    ];
    let middle = [
        format!("{name} showed the {object} to {friend} the {friend_animal}."),
        format!("{name} wanted to keep the {object}, but it belonged to {friend}."),
        format!("The {object} rolled away, and {name} ran after it."),
        format!("{friend} the {friend_animal} helped {name} carry the {object} home."),
    ];
    let count = rng.random_range(1..=3);
    for i in rand::seq::index::sample(rng, middle.len(), count) {
        sentences.push(middle[i].clone());
    }
    sentences.push(format!("In the end, {name} felt {}.", pick(rng, FEELINGS)));
    sentences.push("The end.".to_string());
    sentences.join(" ")
}

/// `("12+7", 19)`: operands up to 99 for + and -, up to 12 for ×.
fn equation(rng: &mut ChaCha8Rng) -> (String, i64) {
    match rng.random_range(0..3) {
        0 => {
            let (a, b) = (rng.random_range(0..100), rng.random_range(0..100));
            (format!("{a}+{b}"), a + b)
        }
        1 => {
            let (a, b) = (rng.random_range(0..100), rng.random_range(0..100));
            let (a, b) = (a.max(b), a.min(b));
            (format!("{a}-{b}"), a - b)
        }
        _ => {
            let (a, b) = (rng.random_range(0..13), rng.random_range(0..13));
            (format!("{a}*{b}"), a * b)
        }
    }
}

/// A question with its correct answer and a plausible wrong one.
struct Task {
    prompt: String,
    answer: String,
    wrong: String,
}

const OPPOSITES: &[(&str, &str)] = &[
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("open", "closed"),
    ("happy", "sad"),
    ("light", "dark"),
];
const WORDS: &[&str] = &[
    "cat", "apple", "river", "stone", "garden", "yellow", "music", "window",
];

/// The words of the copying tasks: enough that most held-out prompts are new combinations,
/// which a model answers by following the rule rather than by recalling a seen answer.
fn copy_words() -> Vec<&'static str> {
    let mut words: Vec<&str> = Vec::new();
    for &word in WORDS.iter().chain(ANIMALS).chain(OBJECTS).chain(COLORS) {
        if !words.contains(&word) {
            words.push(word);
        }
    }
    words
}

fn task(rng: &mut ChaCha8Rng, kinds: &[TaskKind]) -> Task {
    let words = copy_words();
    match kinds[rng.random_range(0..kinds.len())] {
        TaskKind::Arithmetic => {
            let (question, answer) = equation(rng);
            let off = [-2, -1, 1, 2, 10][rng.random_range(0..5)];
            Task {
                prompt: format!("What is {question}?"),
                answer: format!("{question}={answer}"),
                wrong: format!("{question}={}", answer + off),
            }
        }
        TaskKind::Repeat => {
            let word = pick(rng, &words);
            let times = rng.random_range(2..=5);
            let wrong_times = if times == 2 { 3 } else { times - 1 };
            Task {
                prompt: format!("Repeat the word {word} {times} times."),
                answer: vec![word; times].join(" "),
                wrong: vec![word; wrong_times].join(" "),
            }
        }
        TaskKind::Opposite => {
            let (word, opposite) = *OPPOSITES.choose(rng).expect("not empty");
            let wrong = OPPOSITES
                .iter()
                .map(|p| p.1)
                .find(|w| *w != opposite)
                .expect("several");
            Task {
                prompt: format!("What is the opposite of {word}?"),
                answer: opposite.into(),
                wrong: wrong.into(),
            }
        }
        TaskKind::Backwards => {
            let word = pick(rng, WORDS);
            let reversed: String = word.chars().rev().collect();
            // A near miss: the answer with its first two letters swapped.
            let mut wrong: Vec<char> = reversed.chars().collect();
            wrong.swap(0, 1);
            Task {
                prompt: format!("Spell the word {word} backwards."),
                answer: reversed,
                wrong: wrong.into_iter().collect(),
            }
        }
        TaskKind::LastWord => word_of_list(rng, &words, "last"),
        TaskKind::FirstWord => word_of_list(rng, &words, "first"),
        TaskKind::Successor => {
            let n = rng.random_range(0..1000);
            Task {
                prompt: format!("What number comes after {n}?"),
                answer: (n + 1).to_string(),
                wrong: (n + 2).to_string(),
            }
        }
    }
}

/// `What is the first (or last) word of: a b c?`, three different words; the near miss is the
/// word at the other end.
fn word_of_list(rng: &mut ChaCha8Rng, words: &[&str], end: &str) -> Task {
    let list: Vec<&str> = words.choose_multiple(rng, 3).copied().collect();
    let (answer, wrong) = if end == "first" {
        (list[0], list[2])
    } else {
        (list[2], list[0])
    };
    Task {
        prompt: format!("What is the {end} word of: {}?", list.join(" ")),
        answer: answer.into(),
        wrong: wrong.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(generator: Generator, seed: u64) -> Vec<Record> {
        generate(generator, 200, seed).collect()
    }

    #[test]
    fn generators_are_deterministic_for_a_seed() {
        for g in [
            Generator::Stories,
            Generator::Arithmetic,
            Generator::Chat,
            Generator::Preferences,
            Generator::Qa,
        ] {
            assert_eq!(all(g, 7), all(g, 7));
            assert_ne!(all(g, 7), all(g, 8));
        }
    }

    /// Evaluates `a+b`, `a-b`, `a*b`.
    fn eval(expr: &str) -> i64 {
        let op = expr.find(['+', '-', '*']).unwrap();
        let (a, b): (i64, i64) = (expr[..op].parse().unwrap(), expr[op + 1..].parse().unwrap());
        match &expr[op..=op] {
            "+" => a + b,
            "-" => a - b,
            _ => a * b,
        }
    }

    #[test]
    fn arithmetic_is_correct() {
        for r in all(Generator::Arithmetic, 1) {
            let (expr, answer) = r.text.split_once('=').unwrap();
            assert_eq!(eval(expr), answer.parse::<i64>().unwrap(), "{}", r.text);
        }
    }

    /// Checks an answer to a generated prompt by solving the prompt independently.
    fn correct(prompt: &str, answer: &str) -> bool {
        if let Some(list) = prompt
            .strip_prefix("What is the last word of: ")
            .and_then(|p| p.strip_suffix('?'))
        {
            return list.split(' ').next_back() == Some(answer);
        }
        if let Some(list) = prompt
            .strip_prefix("What is the first word of: ")
            .and_then(|p| p.strip_suffix('?'))
        {
            return list.split(' ').next() == Some(answer);
        }
        if let Some(q) = prompt
            .strip_prefix("What is ")
            .and_then(|p| p.strip_suffix('?'))
        {
            if let Some(word) = q.strip_prefix("the opposite of ") {
                return OPPOSITES.iter().any(|&(w, o)| w == word && o == answer);
            }
            return answer
                .split_once('=')
                .is_some_and(|(e, v)| e == q && v.parse() == Ok(eval(q)));
        }
        if let Some(rest) = prompt.strip_prefix("Repeat the word ") {
            let words: Vec<&str> = rest.split(' ').collect();
            let times: usize = words[1].parse().unwrap();
            return answer == vec![words[0]; times].join(" ");
        }
        if let Some(word) = prompt
            .strip_prefix("Spell the word ")
            .and_then(|p| p.strip_suffix(" backwards."))
        {
            return answer == word.chars().rev().collect::<String>();
        }
        if let Some(n) = prompt
            .strip_prefix("What number comes after ")
            .and_then(|p| p.strip_suffix('?'))
        {
            return answer.parse::<u64>() == Ok(n.parse::<u64>().unwrap() + 1);
        }
        panic!("unknown prompt {prompt}");
    }

    #[test]
    fn chat_answers_are_correct() {
        for r in all(Generator::Chat, 3) {
            let m = r.messages.as_ref().unwrap();
            assert_eq!(
                (m[0].role.as_str(), m[1].role.as_str()),
                ("user", "assistant")
            );
            assert!(correct(&m[0].content, &m[1].content), "{:?}", m);
        }
    }

    #[test]
    fn preferences_choose_the_correct_answer_and_reject_a_wrong_one() {
        for r in all(Generator::Preferences, 4) {
            let prompt = r.prompt.as_ref().unwrap();
            assert!(correct(prompt, r.chosen.as_ref().unwrap()), "{r:?}");
            assert!(!correct(prompt, r.rejected.as_ref().unwrap()), "{r:?}");
        }
    }

    #[test]
    fn qa_documents_are_correct_answers_in_plain_text() {
        for r in all(Generator::Qa, 6) {
            let (question, answer) = r.text.split_once(" Answer: ").unwrap();
            let prompt = question.strip_prefix("Question: ").unwrap();
            assert!(correct(prompt, answer), "{}", r.text);
        }
    }

    #[test]
    fn stories_are_varied_sentences() {
        let stories = all(Generator::Stories, 5);
        assert!(stories
            .iter()
            .all(|s| s.text.starts_with("Once upon a time") && s.text.ends_with("The end.")));
        let distinct: std::collections::BTreeSet<&str> =
            stories.iter().map(|s| s.text.as_str()).collect();
        assert!(distinct.len() > 190, "{} distinct of 200", distinct.len());
    }
}
