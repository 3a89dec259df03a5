//! Text to token ids. A `tokenizers` tokenizer defines the ids; for the two kinds the stage
//! trains most, encoding skips its general machinery (normalised strings, offsets, one
//! allocation per piece) and gives the same ids several times faster:
//! - byte-level BPE (GPT-2's scheme): pieces from [`pretokenize`], each BPE-merged once and
//!   then looked up in a per-thread cache;
//! - characters: one lookup per character.
//!
//! Anything else (WordPiece, Unigram, SentencePiece-style BPE, a loaded tokenizer with other
//! settings) goes through `tokenizers`. Special tokens are split out of the text first, as
//! `tokenizers` does. Tests check every fast path against `tokenizers` itself.

use std::cell::RefCell;
use std::collections::HashMap;

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;
use thread_local::ThreadLocal;
use tokenizers::Tokenizer;

use super::pretokenize;

/// Pieces cached per thread before the cache is cleared (bounds memory on unbounded vocabularies
/// of pieces, such as random data).
const CACHE_PIECES: usize = 1 << 20;

pub struct Encoder {
    specials: Option<(AhoCorasick, Vec<u32>)>,
    kind: Kind,
}

enum Kind {
    ByteLevel(Box<ByteLevelBpe>),
    Chars {
        ids: HashMap<char, u32>,
        unknown: u32,
    },
    General(Box<Tokenizer>),
}

impl Encoder {
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, String> {
        let json: Value = serde_json::from_str(
            &tokenizer
                .to_string(false)
                .map_err(|e| format!("cannot serialise the tokenizer: {e}"))?,
        )
        .map_err(|e| format!("cannot read the tokenizer back: {e}"))?;
        let kind = if let Some(bpe) = ByteLevelBpe::from_json(&json) {
            Kind::ByteLevel(Box::new(bpe))
        } else if let Some((ids, unknown)) = chars_from_json(&json) {
            Kind::Chars { ids, unknown }
        } else {
            Kind::General(Box::new(tokenizer.clone()))
        };
        Ok(Encoder {
            specials: special_tokens(&json)?,
            kind,
        })
    }

    /// Whether encoding uses one of the fast paths (for the stage's metrics).
    pub fn fast_path(&self) -> Option<&'static str> {
        match self.kind {
            Kind::ByteLevel(_) => Some("byte_level_bpe"),
            Kind::Chars { .. } => Some("chars"),
            Kind::General(_) => None,
        }
    }

    /// Appends the ids of `text` to `out`.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        let Some((matcher, ids)) = &self.specials else {
            return self.encode_plain(text, out);
        };
        let mut at = 0;
        for found in matcher.find_iter(text) {
            self.encode_plain(&text[at..found.start()], out)?;
            out.push(ids[found.pattern().as_usize()]);
            at = found.end();
        }
        self.encode_plain(&text[at..], out)
    }

    /// Appends the ids of `text` to `ids` and, for each, the byte offset in `text` where the
    /// text it stands for starts (chat templates mark the assistant's tokens by these).
    pub fn encode_with_starts(
        &self,
        text: &str,
        ids: &mut Vec<u32>,
        starts: &mut Vec<usize>,
    ) -> Result<(), String> {
        let mut at = 0;
        if let Some((matcher, special_ids)) = &self.specials {
            for found in matcher.find_iter(text) {
                self.plain_with_starts(&text[at..found.start()], at, ids, starts)?;
                ids.push(special_ids[found.pattern().as_usize()]);
                starts.push(found.start());
                at = found.end();
            }
        }
        self.plain_with_starts(&text[at..], at, ids, starts)
    }

    /// Text without special tokens, which starts at byte `base` of the whole.
    fn plain_with_starts(
        &self,
        text: &str,
        base: usize,
        ids: &mut Vec<u32>,
        starts: &mut Vec<usize>,
    ) -> Result<(), String> {
        if text.is_empty() {
            return Ok(());
        }
        match &self.kind {
            Kind::ByteLevel(bpe) => {
                let first = ids.len();
                bpe.encode(text, ids);
                let mut at = base;
                for &id in &ids[first..] {
                    starts.push(at);
                    at += bpe.byte_len(id);
                }
            }
            Kind::Chars {
                ids: chars,
                unknown,
            } => {
                for (at, c) in text.char_indices() {
                    ids.push(chars.get(&c).copied().unwrap_or(*unknown));
                    starts.push(base + at);
                }
            }
            Kind::General(tokenizer) => {
                let encoding = tokenizer
                    .encode(text, false)
                    .map_err(|e| format!("cannot encode: {e}"))?;
                ids.extend_from_slice(encoding.get_ids());
                starts.extend(
                    encoding
                        .get_offsets()
                        .iter()
                        .map(|&(start, _)| base + start),
                );
            }
        }
        Ok(())
    }

    /// Text without special tokens.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        if text.is_empty() {
            return Ok(());
        }
        match &self.kind {
            Kind::ByteLevel(bpe) => bpe.encode(text, out),
            Kind::Chars { ids, unknown } => out.extend(
                text.chars()
                    .map(|c| ids.get(&c).copied().unwrap_or(*unknown)),
            ),
            Kind::General(tokenizer) => {
                let encoding = tokenizer
                    .encode_fast(text, false)
                    .map_err(|e| format!("cannot encode: {e}"))?;
                out.extend_from_slice(encoding.get_ids());
            }
        }
        Ok(())
    }
}

/// The added tokens marked special, matched in raw text longest first (as `tokenizers` does
/// for tokens that are not normalised and not stripped).
fn special_tokens(json: &Value) -> Result<Option<(AhoCorasick, Vec<u32>)>, String> {
    let mut patterns = Vec::new();
    let mut ids = Vec::new();
    for token in json["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(content), Some(id)) = (token["content"].as_str(), token["id"].as_u64()) {
            patterns.push(content.to_string());
            ids.push(id as u32);
        }
    }
    if patterns.is_empty() {
        return Ok(None);
    }
    let matcher = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(&patterns)
        .map_err(|e| format!("special tokens: {e}"))?;
    Ok(Some((matcher, ids)))
}

/// Whether every added token is matched literally (no stripping, whole-word or normalised
/// matching), so that [`special_tokens`] splits text as `tokenizers` does.
fn added_tokens_are_literal(json: &Value) -> bool {
    json["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|t| {
            t["single_word"] == false
                && t["lstrip"] == false
                && t["rstrip"] == false
                && (t["normalized"] == false || json["normalizer"].is_null())
        })
}

/// GPT-2's map from bytes to the printable characters byte-level vocabularies are written in:
/// printable Latin-1 stands for itself, the other bytes for 256, 257, … in byte order.
pub fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut chars = ['\0'; 256];
    let mut next = 256;
    for b in 0..=255u8 {
        chars[b as usize] = if printable(b) {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below the surrogates")
        };
    }
    chars
}

/// A thread's encoded pieces: bytes → ids.
type PieceCache = HashMap<Box<[u8]>, Box<[u32]>>;

/// Byte-level BPE with GPT-2's pre-tokenizer: no normaliser, no dropout, no subword prefixes.
struct ByteLevelBpe {
    /// The id of each single byte.
    byte_ids: [u32; 256],
    /// (left, right) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Each id's length in bytes (its vocabulary entry has one character per byte).
    byte_lens: HashMap<u32, usize>,
    cache: ThreadLocal<RefCell<PieceCache>>,
}

impl ByteLevelBpe {
    /// The fast encoder for `json`, if it describes a tokenizer this path encodes identically.
    fn from_json(json: &Value) -> Option<Self> {
        let model = &json["model"];
        let byte_level = |p: &Value| {
            p["type"] == "ByteLevel" && p["add_prefix_space"] == false && p["use_regex"] == true
        };
        let pre = &json["pre_tokenizer"];
        let pre_ok = byte_level(pre)
            || (pre["type"] == "Sequence"
                && pre["pretokenizers"]
                    .as_array()
                    .is_some_and(|s| s.len() == 1 && byte_level(&s[0])));
        let plain_bpe = model["type"] == "BPE"
            && model["dropout"].is_null()
            && model["continuing_subword_prefix"].is_null()
            && model["end_of_word_suffix"].is_null()
            && model["byte_fallback"] != true
            && model["ignore_merges"] != true;
        if !(pre_ok && plain_bpe && json["normalizer"].is_null() && added_tokens_are_literal(json))
        {
            return None;
        }
        let vocab: HashMap<&str, u32> = model["vocab"]
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.as_str(), v.as_u64()? as u32)))
            .collect::<Option<_>>()?;
        let chars = byte_chars();
        let mut byte_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = *vocab.get(c.to_string().as_str())?;
        }
        let mut merges = HashMap::new();
        for (rank, merge) in model["merges"].as_array()?.iter().enumerate() {
            let (left, right) = match merge {
                Value::Array(pair) => (pair.first()?.as_str()?, pair.get(1)?.as_str()?),
                Value::String(pair) => pair.split_once(' ')?,
                _ => return None,
            };
            let merged = vocab.get(format!("{left}{right}").as_str())?;
            let pair = (*vocab.get(left)?, *vocab.get(right)?);
            merges.entry(pair).or_insert((rank as u32, *merged));
        }
        let byte_lens = vocab
            .iter()
            .map(|(token, &id)| (id, token.chars().count()))
            .collect();
        Some(ByteLevelBpe {
            byte_ids,
            merges,
            byte_lens,
            cache: ThreadLocal::new(),
        })
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut cache = self.cache.get_or_default().borrow_mut();
        for piece in pretokenize::pieces(text) {
            let piece = piece.as_bytes();
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                continue;
            }
            let ids = self.merge(piece);
            out.extend_from_slice(&ids);
            if cache.len() >= CACHE_PIECES {
                cache.clear();
            }
            cache.insert(piece.into(), ids.into_boxed_slice());
        }
    }

    /// How many bytes of text `id` stands for.
    fn byte_len(&self, id: u32) -> usize {
        self.byte_lens.get(&id).copied().unwrap_or(1)
    }

    /// BPE: starting from single bytes, merge the adjacent pair of lowest rank (leftmost first)
    /// until no pair has a merge.
    fn merge(&self, piece: &[u8]) -> Vec<u32> {
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        loop {
            let best = ids
                .windows(2)
                .enumerate()
                .filter_map(|(at, pair)| {
                    self.merges
                        .get(&(pair[0], pair[1]))
                        .map(|&(rank, merged)| (rank, at, merged))
                })
                .min();
            let Some((_, at, merged)) = best else {
                return ids;
            };
            ids[at] = merged;
            ids.remove(at + 1);
        }
    }
}

/// A character-level tokenizer: a BPE without merges over single characters, no pre-tokenizer
/// and no normaliser. Returns each character's id and the unknown token's.
fn chars_from_json(json: &Value) -> Option<(HashMap<char, u32>, u32)> {
    let model = &json["model"];
    let plain = model["type"] == "BPE"
        && model["merges"].as_array().is_some_and(Vec::is_empty)
        && model["dropout"].is_null()
        && model["continuing_subword_prefix"].is_null()
        && model["end_of_word_suffix"].is_null()
        && model["byte_fallback"] != true
        && model["fuse_unk"] != true
        && json["pre_tokenizer"].is_null()
        && json["normalizer"].is_null()
        && added_tokens_are_literal(json);
    if !plain {
        return None;
    }
    let unknown = model["vocab"].get(model["unk_token"].as_str()?)?.as_u64()? as u32;
    let ids = model["vocab"]
        .as_object()?
        .iter()
        .filter_map(|(token, id)| {
            let mut chars = token.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Some((c, id.as_u64()? as u32)),
                _ => None,
            }
        })
        .collect();
    Some((ids, unknown))
}
