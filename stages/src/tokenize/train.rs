//! Training a vocabulary with the `tokenizers` crate. For byte-level BPE and characters the
//! stage counts words (or characters) itself, in parallel with the hand-written pre-tokenizer,
//! and hands the counts to the trainer: counting is most of the training time, and `tokenizers`
//! counts through its general pre-tokenization machinery.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::ParamProblem;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, Tokenizer};

use super::encoder::byte_chars;
use super::pretokenize;
use super::Corpus;

/// Kinds of vocabulary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// BPE over bytes with GPT-2's pre-tokenizer: any text, no unknown tokens, exact round trip.
    #[default]
    ByteLevelBpe,
    /// BPE over characters, SentencePiece style (`▁` marks spaces).
    Bpe,
    /// WordPiece, BERT style (`##` continues a word; spacing is not kept).
    Wordpiece,
    /// Unigram language model, SentencePiece style.
    Unigram,
    /// One token per character seen in the corpus (nanoGPT's shakespeare_char).
    Char,
}

/// How to train the vocabulary.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    #[serde(default)]
    pub model: ModelKind,
    /// Tokens in the vocabulary, special tokens included. Default 4096; for `char`, every
    /// character seen (an error if given and smaller).
    #[serde(default)]
    pub vocab_size: Option<NonZeroUsize>,
    /// A pair (or, for `char`, a character) is learnt only if seen at least this often.
    #[serde(default)]
    pub min_frequency: u64,
    /// Added first, in order, with the first ids.
    #[serde(default = "default_special_tokens")]
    pub special_tokens: Vec<String>,
    /// Stands for text outside the vocabulary (all kinds but byte-level BPE, which has none).
    #[serde(default = "default_unk_token")]
    pub unk_token: String,
}

impl Default for TrainParams {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

fn default_special_tokens() -> Vec<String> {
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec()
}

fn default_unk_token() -> String {
    "<|unk|>".into()
}

const DEFAULT_VOCAB: usize = 4096;

impl TrainParams {
    /// What the vocabulary's params must satisfy together (paths from the stage's `with:`).
    pub fn problems(&self) -> Vec<ParamProblem> {
        let vocab_size = self.vocab_size.map_or(DEFAULT_VOCAB, NonZeroUsize::get);
        let needed = 256 + self.special_tokens.len();
        if self.model == ModelKind::ByteLevelBpe && vocab_size < needed {
            let problem = ParamProblem::new(
                "train.vocab_size",
                format!(
                    "`train.vocab_size` {vocab_size} is below the 256 bytes plus {} special \
                     tokens a byte-level vocabulary starts with",
                    self.special_tokens.len()
                ),
            );
            return vec![problem
                .or_at("train.model")
                .help(format!("make it at least {needed}"))];
        }
        Vec::new()
    }

    /// Whether the vocabulary's size holds what every vocabulary trained on `corpus` starts
    /// with: its characters (as the kind's pre-tokenizer leaves them) plus the special tokens.
    /// Byte-level BPE starts with 256 bytes whatever the corpus ([`TrainParams::problems`]).
    pub fn alphabet_problems(&self, corpus: &Corpus) -> Vec<ParamProblem> {
        let vocab_size = match (self.model, self.vocab_size) {
            (ModelKind::ByteLevelBpe, _) | (ModelKind::Char, None) => return Vec::new(),
            (_, size) => size.map_or(DEFAULT_VOCAB, NonZeroUsize::get),
        };
        let characters = match self.starting_alphabet(corpus) {
            Ok(characters) => characters,
            Err(e) => return vec![ParamProblem::input("corpus", 0, e)],
        };
        let needed = characters + specials(self).len();
        if needed <= vocab_size {
            return Vec::new();
        }
        let leave_out = match self.model {
            ModelKind::Char => ", or leave it out: a `char` vocabulary takes every character seen",
            _ => "",
        };
        vec![ParamProblem::new(
            "train.vocab_size",
            format!(
                "`train.vocab_size` {vocab_size} is below what the corpus needs: its {characters} \
                 characters plus {} special tokens make {needed} tokens",
                specials(self).len()
            ),
        )
        .or_at("train.model")
        .help(format!("make it at least {needed}{leave_out}"))]
    }

    /// How many characters a vocabulary of this kind holds before it learns anything: those
    /// `char` keeps (seen `min_frequency` times); for BPE and Unigram, every character after
    /// the Metaspace pre-tokenizer (spaces become `▁`, which also starts every text); for
    /// WordPiece every character but whitespace, which its pre-tokenizer drops (its `##`
    /// continuations come on top, so this is a lower bound there).
    fn starting_alphabet(&self, corpus: &Corpus) -> Result<usize, String> {
        if self.model == ModelKind::Char {
            return Ok(alphabet(self, corpus)?.len());
        }
        let model = self.model;
        let counts = corpus.count(move |text, seen: &mut HashMap<char, u64>| {
            for c in text.chars() {
                let c = match (model, c) {
                    (ModelKind::Wordpiece, c) if c.is_whitespace() => continue,
                    (ModelKind::Bpe | ModelKind::Unigram, ' ') => '▁',
                    (_, c) => c,
                };
                *seen.entry(c).or_default() += 1;
            }
        })?;
        let metaspace = matches!(self.model, ModelKind::Bpe | ModelKind::Unigram);
        Ok(counts.len() + usize::from(metaspace && !counts.contains_key(&'▁')))
    }

    /// Whether a vocabulary trained with these params has `token`: the special tokens (and
    /// the unknown token) always; a `char` vocabulary, a single character if the corpus has it.
    pub fn may_have(&self, token: &str) -> bool {
        specials(self).iter().any(|t| t == token)
            || (self.model == ModelKind::Char && token.chars().count() == 1)
    }
}

/// A vocabulary trained on the training split of `corpus`.
pub fn train(params: &TrainParams, corpus: &Corpus) -> Result<Tokenizer, String> {
    let vocab_size = params.vocab_size.map_or(DEFAULT_VOCAB, NonZeroUsize::get);
    let tokenizer = match params.model {
        ModelKind::ByteLevelBpe => byte_level_bpe(params, vocab_size, corpus)?,
        ModelKind::Char => chars(params, corpus)?,
        ModelKind::Bpe | ModelKind::Wordpiece | ModelKind::Unigram => {
            with_tokenizers(params, vocab_size, corpus)?
        }
    };
    let trained = tokenizer.get_vocab_size(true);
    let limit = match params.model {
        ModelKind::Char => params.vocab_size.map(NonZeroUsize::get),
        _ => Some(vocab_size),
    };
    if let Some(limit) = limit.filter(|&limit| trained > limit) {
        return Err(format!(
            "vocab_size {limit} is below what the corpus needs: its alphabet plus {} special \
             tokens make {trained} tokens already",
            specials(params).len()
        ));
    }
    Ok(tokenizer)
}

/// The special tokens, with the unknown token for the kinds that use one.
fn specials(params: &TrainParams) -> Vec<String> {
    let mut tokens = params.special_tokens.clone();
    if params.model != ModelKind::ByteLevelBpe && !tokens.contains(&params.unk_token) {
        tokens.push(params.unk_token.clone());
    }
    tokens
}

fn added(params: &TrainParams) -> Vec<AddedToken> {
    specials(params)
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .collect()
}

fn byte_level_bpe(
    params: &TrainParams,
    vocab_size: usize,
    corpus: &Corpus,
) -> Result<Tokenizer, String> {
    let counts = corpus.count(|text, counts: &mut HashMap<String, u64>| {
        for piece in pretokenize::pieces(text) {
            match counts.get_mut(piece) {
                Some(n) => *n += 1,
                None => {
                    counts.insert(piece.to_string(), 1);
                }
            }
        }
    })?;
    let chars = byte_chars();
    let words: ahash::AHashMap<compact_str::CompactString, u64> = counts
        .into_iter()
        .map(|(piece, n)| (piece.bytes().map(|b| chars[b as usize]).collect(), n))
        .collect();
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(params.min_frequency)
        .special_tokens(added(params))
        .initial_alphabet(chars.into_iter().collect())
        .show_progress(false)
        .build();
    let mut bpe = BPE::default();
    trainer
        .do_train(&words, &mut bpe)
        .map_err(|e| format!("training byte-level BPE: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.add_special_tokens(&added(params));
    Ok(tokenizer)
}

/// The characters a `char` vocabulary learns from `corpus`: those seen at least
/// `min_frequency` times, sorted.
fn alphabet(params: &TrainParams, corpus: &Corpus) -> Result<Vec<char>, String> {
    let counts = corpus.count(|text, counts: &mut HashMap<char, u64>| {
        for c in text.chars() {
            *counts.entry(c).or_default() += 1;
        }
    })?;
    let mut seen: Vec<char> = counts
        .into_iter()
        .filter(|&(_, n)| n >= params.min_frequency.max(1))
        .map(|(c, _)| c)
        .collect();
    seen.sort_unstable();
    Ok(seen)
}

fn chars(params: &TrainParams, corpus: &Corpus) -> Result<Tokenizer, String> {
    let seen = alphabet(params, corpus)?;
    let specials = specials(params);
    let vocab: ahash::AHashMap<String, u32> = specials
        .iter()
        .cloned()
        .chain(seen.iter().map(char::to_string))
        .enumerate()
        .map(|(id, token)| (token, id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .unk_token(params.unk_token.clone())
        .build()
        .map_err(|e| format!("building the character vocabulary: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_decoder(Some(Fuse::new()));
    tokenizer.add_special_tokens(&added(params));
    Ok(tokenizer)
}

/// BPE (SentencePiece style), WordPiece and Unigram, trained by `tokenizers` end to end.
fn with_tokenizers(
    params: &TrainParams,
    vocab_size: usize,
    corpus: &Corpus,
) -> Result<Tokenizer, String> {
    let metaspace = || Metaspace::new('▁', PrependScheme::Always, true);
    let (mut tokenizer, mut trainer): (Tokenizer, TrainerWrapper) = match params.model {
        ModelKind::Bpe => {
            let bpe = BPE::builder()
                .unk_token(params.unk_token.clone())
                .build()
                .map_err(|e| e.to_string())?;
            let mut tokenizer = Tokenizer::new(bpe);
            tokenizer
                .with_pre_tokenizer(Some(metaspace()))
                .with_decoder(Some(metaspace()));
            let trainer = BpeTrainer::builder()
                .vocab_size(vocab_size)
                .min_frequency(params.min_frequency)
                .special_tokens(added(params))
                .show_progress(false)
                .build();
            (tokenizer, trainer.into())
        }
        ModelKind::Wordpiece => {
            let model = WordPiece::builder()
                .unk_token(params.unk_token.clone())
                .build()
                .map_err(|e| e.to_string())?;
            let mut tokenizer = Tokenizer::new(model);
            tokenizer
                .with_pre_tokenizer(Some(BertPreTokenizer))
                .with_decoder(Some(WordPieceDecoder::default()));
            let trainer = WordPieceTrainer::builder()
                .vocab_size(vocab_size)
                .min_frequency(params.min_frequency)
                .special_tokens(added(params))
                .show_progress(false)
                .build();
            (tokenizer, trainer.into())
        }
        ModelKind::Unigram => {
            let mut tokenizer = Tokenizer::new(Unigram::default());
            tokenizer
                .with_pre_tokenizer(Some(metaspace()))
                .with_decoder(Some(metaspace()));
            let trainer = UnigramTrainer::builder()
                .vocab_size(vocab_size as u32)
                .special_tokens(added(params))
                .unk_token(Some(params.unk_token.clone()))
                .show_progress(false)
                .build()
                .map_err(|e| e.to_string())?;
            (tokenizer, trainer.into())
        }
        ModelKind::ByteLevelBpe | ModelKind::Char => unreachable!("trained by the stage"),
    };
    let texts = corpus.texts()?;
    tokenizer
        .train(&mut trainer, texts.into_iter())
        .map_err(|e| format!("training the vocabulary: {e}"))?;
    tokenizer.add_special_tokens(&added(params));
    Ok(tokenizer)
}
